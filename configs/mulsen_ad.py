"""The paper's model and recipe on MulSen-AD alone (RGB + infrared, 15 classes).

    python -m unimmad_jax.main --config=configs/mulsen_ad.py --workdir=runs/mulsen_ad \\
        --config.data.data_dir=data

Data: `python -m unimmad_jax.data prepare --dataset mulsen_ad ...` (README, "Datasets").  The paper
reports image AUROC 85.46 (unified setting, unimmad_jax/paper_results.json); no run of this config
is measured.  Two slots, as configs/mvtec3d.py, whose step's compiler estimates its docstring gives.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mulsen_ad",)
    config.data.num_slots = 2
    return config
