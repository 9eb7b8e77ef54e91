"""The built-in synthetic data and a small model: trains, evaluates and calibrates on a CPU in minutes.

    python -m unimmad_jax.main --config=configs/demo.py --workdir=runs/demo

Data: none to download; `synthetic` is prepared into `data/` on the first run, in seconds.
Its prior is random (`train.prior=random`, it says so): the ImageNet WideResNet-50-2 does not fit its
small widths, so the prior generator is a fixed random feature extractor whose BatchNorm statistics
are measured on a training batch; the method still has to find the defects.

Expected (docs/performance.md#the-demo, 2-core Intel Xeon CPUs, 12 epochs): about 4 minutes in all;
mean over the 5 classes I-AUROC 100.00, P-AUROC 98.24, AUPRO@30% 94.19, P-AP 32.23 on a Xeon with AMX
(float32 rounds differently on other CPUs).  With
`--config.data.datasets='("synthetic_hard",)'`: 5.0 minutes, I-AUROC 88.75.
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
    config.train.prior = "random"
    config.train.num_epochs = 12
    config.train.batch_size = 16
    config.train.eval_every_epochs = 4
    config.train.log_every_steps = 5
    config.eval.batch_size = 16
    return config
