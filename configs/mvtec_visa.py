"""The RGB-only sets of the paper's 66-class setting: MVTec AD and VisA, one modality slot.

    python -m unimmad_jax.main --config=configs/mvtec_visa.py --workdir=runs/mvtec_visa \\
        --config.data.data_dir=data

Data: `python -m unimmad_jax.data prepare --dataset mvtec_ad ...` and `--dataset visa ...` (README,
"Datasets").  No run of this config is measured, and unimmad_jax/paper_results.json holds no number
for it.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mvtec_ad", "visa")
    config.data.num_slots = 1
    return config
