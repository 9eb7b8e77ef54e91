"""The paper's model and recipe on the authors' preprocessed medical sets (`mmad_meta/<name>`).

    python -m unimmad_jax.main --config=configs/medical.py --workdir=runs/medical \\
        --config.data.data_dir=data

Data: `python -m unimmad_jax.data prepare --dataset mmad_meta/<name> ...` for brats, retinaad,
liverad and hyperad (README, "Datasets").  The paper reports image AUROC BraTS 95.84 and UniMed
96.34 (unified setting; UniMed read as the mean of the other three, unimmad_jax/paper_results.json);
no run of this config is measured.  Four slots (BraTS has four modalities), as configs/unified.py.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mmad_meta/brats", "mmad_meta/retinaad", "mmad_meta/liverad", "mmad_meta/hyperad")
    config.data.num_slots = 4
    return config
