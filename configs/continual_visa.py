"""Continual learning on VisA with the protocols of the continual anomaly-detection papers (IUF and others).

    python -m unimmad_jax.main --config=configs/continual_visa.py:8-4 --workdir=runs/cl_visa_8_4 --mode=continual

Classes in alphabetical order; "a-b": a first task of a classes, then one of b; "axb": b tasks of
a classes each ("8-1x4": eight classes, then four tasks of one).  Data: the prepared `visa` (README,
"Datasets").  Each task trains the full recipe (`train.num_epochs`); no run of these protocols is
measured.
"""

from unimmad_jax.config import protocol_config

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
    return protocol_config("visa", 1, PROTOCOLS, protocol)
