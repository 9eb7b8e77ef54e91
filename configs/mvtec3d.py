"""The paper's model and recipe on MVTec 3D-AD alone (RGB + depth, 10 classes).

    python -m unimmad_jax.main --config=configs/mvtec3d.py --workdir=runs/mvtec3d \\
        --config.data.data_dir=data

Data: `python -m unimmad_jax.data prepare --dataset mvtec3d ...` (README, "Datasets").  The paper
reports image AUROC 92.53 (unified setting, unimmad_jax/paper_results.json); no full run of this
config is measured.  Cost, a compiler estimate (docs/accelerators.md, bf16, 256 px, not a run on
the device): on a v5e at 8 images per chip an 86.3 ms roofline step, 93 images/s per chip (109 with
`--config.train.fsdp=True`), at 84 per chip (the most that fits) 160; on one H200 at 32 images a
30.7 ms roofline step.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mvtec3d",)
    config.data.num_slots = 2
    return config
