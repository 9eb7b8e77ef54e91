"""The paper's unified model and recipe over MVTec 3D-AD, Eyecandies, MulSen-AD and the medical sets.

The recipe: docs/model.md#training-recipe.

Prepare each dataset first (README, "Datasets"); the medical sets come from the authors'
preprocessed release as `mmad_meta/<name>`.  Start from ImageNet prior weights:
`--config.train.init_from=<folder from python -m unimmad_jax.convert prior>`.
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
