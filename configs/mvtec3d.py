"""The paper's model and recipe on MVTec 3D-AD alone (RGB + depth, 10 classes)."""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mvtec3d",)
    config.data.num_slots = 2
    return config
