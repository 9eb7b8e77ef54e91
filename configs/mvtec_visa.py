"""The RGB-only sets of the paper's 66-class setting: MVTec AD and VisA, one modality slot."""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.data.datasets = ("mvtec_ad", "visa")
    config.data.num_slots = 1
    return config
