"""Continual learning on VisA with the protocols of the continual anomaly-detection papers (IUF and others).

    python -m unimmad_jax.main --config=configs/continual_visa.py:8-4 --workdir=runs/cl_visa_8_4 --mode=continual

Classes in alphabetical order; "a-b": a first task of a classes, then one of b; "axb": b tasks of
a classes each ("8-1x4": eight classes, then four tasks of one).
"""

from unimmad_jax.config import default_config

PROTOCOLS = {
    "11-1": (
        ("visa:candle,capsules,cashew,chewinggum,fryum,macaroni1,macaroni2,pcb1,pcb2,pcb3,pcb4",),
        ("visa:pipe_fryum",),
    ),
    "8-4": (
        ("visa:candle,capsules,cashew,chewinggum,fryum,macaroni1,macaroni2,pcb1",),
        ("visa:pcb2,pcb3,pcb4,pipe_fryum",),
    ),
    "8-1x4": (
        ("visa:candle,capsules,cashew,chewinggum,fryum,macaroni1,macaroni2,pcb1",),
        ("visa:pcb2",),
        ("visa:pcb3",),
        ("visa:pcb4",),
        ("visa:pipe_fryum",),
    ),
}


def get_config(protocol: str = "8-4"):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown VisA protocol {protocol!r} (after the config path's ':'); one of {list(PROTOCOLS)}")
    config = default_config()
    config.data.datasets = ("visa",)
    config.data.num_slots = 1
    config.continual.tasks = PROTOCOLS[protocol]
    return config
