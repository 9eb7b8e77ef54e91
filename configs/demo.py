"""The built-in synthetic data and a small model: trains and evaluates on a 2-core CPU in a few minutes.

No pretrained prior can be downloaded here, so the prior generator keeps its random weights (a fixed
random feature extractor whose BatchNorm statistics are measured on a training batch); the method
still has to find the defects.
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.image_size = 64
    config.model.embedding_widths = (12, 24)
    config.model.planes = (16, 32, 64)
    config.model.blocks = (1, 1, 1)
    config.model.stem_width = 16
    config.model.fcm_dim = 96
    config.model.moe_dim = 32
    config.model.base_num = 4
    config.model.router_num = 8
    config.data.data_dir = "data"
    config.data.num_read_threads = 2
    config.train.num_epochs = 12
    config.train.batch_size = 16
    config.train.eval_every_epochs = 4
    config.train.log_every_steps = 5
    config.eval.batch_size = 16
    return config
