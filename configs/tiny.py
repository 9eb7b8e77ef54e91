"""A few channels of every part of the model on two synthetic classes (RGB+depth and gray): for tests.

    python -m unimmad_jax.main --config=configs/tiny.py --workdir=runs/tiny

Data: built-in `synthetic`, prepared on the first run.  It computes nothing useful: near chance
after its 3 epochs.  On a 2-core CPU its training step traces, lowers and compiles in about 20 s
and runs in under a second (docs/performance.md#test-suite-time).
"""

from unimmad_jax.config import default_config


def get_config():
    config = default_config()
    config.image_size = 64
    config.model.embedding_widths = (4, 8)
    config.model.planes = (4, 8, 16)
    config.model.blocks = (1, 1, 1)
    config.model.stem_width = 8
    config.model.fcm_dim = 24
    config.model.moe_dim = 8
    config.model.base_num = 2
    config.model.router_num = 4
    # The accelerators' forms: at these widths they also compile in half the time of the CPU forms
    # (docs/performance.md#test-suite-time); tests/test_layers.py holds the CPU forms equal to them.
    config.model.conv_impl = "native"
    config.data.data_dir = "data"
    config.data.classes.synthetic = ("tiles", "brain_scan")
    config.data.num_read_threads = 0
    config.train.prior = "random"  # the ImageNet WideResNet-50-2 does not fit these widths
    config.train.num_epochs = 3
    config.train.batch_size = 8
    config.train.eval_every_epochs = 3
    config.train.log_every_steps = 5
    config.eval.batch_size = 8
    return config
