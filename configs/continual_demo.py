"""Continual learning on the built-in hard synthetic data: two industrial classes, then a third, then the scans.

    python -m unimmad_jax.main --config=configs/continual_demo.py --workdir=runs/continual --mode=continual

The demo's model and random prior (configs/demo.py) on `synthetic_hard` (built in, prepared on the first run), where
it does not reach 100 %: forgetting is measurable.  `--config.continual.joint=True` adds the model
trained on all tasks at once; `--config.continual.replay_per_class=N` replays N samples of each
earlier class.

Expected (docs/performance.md#the-demo, a 2-core CPU): 11.8 minutes for the three tasks; final mean
I-AUROC 65.86, average forgetting 36.11 points.  With `replay_per_class=8` and `joint=True`:
11.1 minutes, final mean I-AUROC 86.46, no forgetting, the joint model 90.16.
"""

import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location("configs_demo", Path(__file__).with_name("demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.data.datasets = ("synthetic_hard",)
    config.continual.tasks = (
        ("synthetic_hard:tiles,plate",),
        ("synthetic_hard:foam",),
        ("synthetic_hard:brain_scan,lung_scan",),
    )
    config.train.eval_every_epochs = 1000  # the protocol evaluates every task after every task
    return config
