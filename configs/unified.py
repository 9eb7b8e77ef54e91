"""The paper's unified model and recipe over MVTec 3D-AD, Eyecandies, MulSen-AD and the medical sets.

    python -m unimmad_jax.main --config=configs/unified.py --workdir=runs/unified \\
        --config.data.data_dir=data

The recipe: docs/model.md#training-recipe.  Data: prepare each dataset first (README, "Datasets");
the medical sets come from the authors' preprocessed release as `mmad_meta/<name>`.  The prior is
ImageNet's (`train.prior=imagenet`, downloaded once; README, "Weights").

The paper reports image AUROC (unified setting, unimmad_jax/paper_results.json): MVTec 3D-AD 92.53,
Eyecandies 85.57, MulSen-AD 85.46, BraTS 95.84, UniMed 96.34; `--mode=eval` prints ours beside them.
No full run of this config is measured.  Cost, a TPU compiler estimate (docs/accelerators.md, bf16,
256 px, not a run on a TPU): on a v5e at 8 images per chip a 127.6 ms roofline step, 63 images/s per
chip (74 with `--config.train.fsdp=True`); at 40 per chip 110 images/s per chip.  An epoch draws
about 22,000 samples (2,190 steps of the default global batch of 10).
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = (
        "mvtec3d",
        "eyecandies",
        "mulsen_ad",
        "mmad_meta/brats",
        "mmad_meta/retinaad",
        "mmad_meta/liverad",
        "mmad_meta/hyperad",
    )
    config.data.num_slots = 4
    config.train.num_epochs = 200  # the release's config; the paper reports 300
    return config
