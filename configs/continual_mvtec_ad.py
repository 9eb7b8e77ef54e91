"""Continual learning on MVTec AD with the protocols of the continual anomaly-detection papers (IUF and others).

    python -m unimmad_jax.main --config=configs/continual_mvtec_ad.py:10-5 --workdir=runs/cl_mvtec_10_5 --mode=continual

Classes in alphabetical order; "a-b": a first task of a classes, then one of b; "axb": b tasks of
a classes each ("10-1x5": ten classes, then five tasks of one; "3x5": five tasks of three).
Data: the prepared `mvtec_ad` (README, "Datasets").  Each task trains the full recipe
(`train.num_epochs`); no run of these protocols is measured.
"""

from unimmad_jax.config import protocol_config

PROTOCOLS = {
    "14-1": (
        (
            "mvtec_ad:bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw,tile,toothbrush,"
            "transistor,wood",
        ),
        ("mvtec_ad:zipper",),
    ),
    "10-5": (
        ("mvtec_ad:bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw",),
        ("mvtec_ad:tile,toothbrush,transistor,wood,zipper",),
    ),
    "10-1x5": (
        ("mvtec_ad:bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw",),
        ("mvtec_ad:tile",),
        ("mvtec_ad:toothbrush",),
        ("mvtec_ad:transistor",),
        ("mvtec_ad:wood",),
        ("mvtec_ad:zipper",),
    ),
    "3x5": (
        ("mvtec_ad:bottle,cable,capsule",),
        ("mvtec_ad:carpet,grid,hazelnut",),
        ("mvtec_ad:leather,metal_nut,pill",),
        ("mvtec_ad:screw,tile,toothbrush",),
        ("mvtec_ad:transistor,wood,zipper",),
    ),
}


def get_config(protocol: str = "10-5"):
    return protocol_config("mvtec_ad", 1, PROTOCOLS, protocol)
