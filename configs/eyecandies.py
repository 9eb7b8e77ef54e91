"""The paper's model and recipe on Eyecandies alone (RGB + depth, 10 classes).

    python -m unimmad_jax.main --config=configs/eyecandies.py --workdir=runs/eyecandies \\
        --config.data.data_dir=data

Data: `python -m unimmad_jax.data prepare --dataset eyecandies ...` (README, "Datasets").  The paper
reports image AUROC 85.57 (unified setting, unimmad_jax/paper_results.json); no run of this config
is measured.  Two slots, as configs/mvtec3d.py, whose step's compiler estimates its docstring gives.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("eyecandies",)
    config.data.num_slots = 2
    return config
