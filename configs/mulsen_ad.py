"""The paper's model and recipe on MulSen-AD alone (RGB + infrared, 15 classes)."""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mulsen_ad",)
    config.data.num_slots = 2
    return config
