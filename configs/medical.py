"""The paper's model and recipe on the authors' preprocessed medical sets (`mmad_meta/<name>`)."""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mmad_meta/brats", "mmad_meta/retinaad", "mmad_meta/liverad", "mmad_meta/hyperad")
    config.data.num_slots = 4
    return config
