"""The deterministic parity weights (`experiments.parity.reference_checkpoint`) are those the fixtures were made with.

The expected numbers were recorded from the recipe that made the PyTorch fixtures: the sum (in
float64) and the first element of one tensor per rule of the recipe.
"""

import numpy as np
import pytest
from helpers import PARITY

from experiments.parity import reference_checkpoint

RECORDED = [  # key, shape, salt, dtype, sum, first element
    ("0.model.conv1.weight", (64, 3, 7, 7), "", "float32", 3.8423657992766493, -0.016948526725172997),
    ("1.bn.running_var", (8,), "traj", "float32", 6.163115441799164, 1.2527594566345215),
    ("input_embedding", (12, 4, 4), "unseen", "float32", 0.3244545000852668, 0.034755364060401917),
    ("0.cmoe.experts", (4, 2, 3), "", "float32", -3.7488409727811813, -0.08155300468206406),
    ("0.cmoe.expert_bases.0", (2, 3, 3, 3, 3), "x", "float32", -2.4281261113937944, 0.0923963114619255),
    ("layer1.0.bn1.weight", (5,), "", "float32", 5.0395509004592896, 1.0018703937530518),
    ("layer1.0.bn1.bias", (5,), "", "float32", 0.32610204815864563, 0.0515865758061409),
    ("fc.num_batches_tracked", (), "", "int64", 0.0, 0.0),
    ("2.linear.weight", (3, 4), "s", "float32", -2.4300392754375935, 0.3666166365146637),
    ("bn.running_mean", (3,), "", "float32", -0.23141112551093102, -0.14306138455867767),
]


@pytest.mark.parametrize("key, shape, salt, dtype, total, first", RECORDED)
def test_recipe_gives_the_recorded_values(key, shape, salt, dtype, total, first):
    value = reference_checkpoint.tensor(key, shape, salt)
    assert value.shape == shape and str(value.dtype) == dtype
    assert float(value.astype(np.float64).sum()) == total
    assert float(value.ravel()[0]) == first


def test_manifests_cover_every_checkpoint_file():
    manifests = reference_checkpoint.manifests(size=64, parity_dir=PARITY)
    assert set(manifests) == {*reference_checkpoint.PARTS, "prior"}
    assert manifests["input_embedding"]["input_embedding"] == [12, 64, 64]
    assert "layer4.2.conv3.weight" in manifests["prior"]
