"""Continual learning on MVTec 3D-AD (RGB + depth): two protocols in the style of the 2D ones.

    python -m unimmad_jax.main --config=configs/continual_mvtec3d.py:5-5 --workdir=runs/cl_mvtec3d_5_5 --mode=continual

Classes in alphabetical order; "5-5": five classes, then the other five; "9-1": nine, then tire.
Data: the prepared `mvtec3d` (README, "Datasets").  Each task trains the full recipe
(`train.num_epochs`); no run of these protocols is measured.
"""

from unimmad_jax.config import protocol_config

PROTOCOLS = {
    "5-5": (
        ("mvtec3d:bagel,cable_gland,carrot,cookie,dowel",),
        ("mvtec3d:foam,peach,potato,rope,tire",),
    ),
    "9-1": (
        ("mvtec3d:bagel,cable_gland,carrot,cookie,dowel,foam,peach,potato,rope",),
        ("mvtec3d:tire",),
    ),
}


def get_config(protocol: str = "5-5"):
    return protocol_config("mvtec3d", 2, PROTOCOLS, protocol)
