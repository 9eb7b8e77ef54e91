"""Exact pair packing's index arithmetic (`unimmad_jax.packing`) against a loop over the batch."""

import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax import packing

MASK = np.array(
    [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
        [False, True, False, True],
        [True, False, False, False],
    ]
)


def test_pack_pairs_lists_each_groups_valid_pairs_sample_major():
    fields = packing.pack_pairs(MASK, groups=2, budget=8)
    assert {k: (v.shape, v.dtype) for k, v in fields.items()} == {
        "pair_sample": ((2, 8), np.int32),
        "pair_slot": ((2, 8), np.int32),
        "pair_valid": ((2, 8), bool),
    }
    np.testing.assert_array_equal(fields["pair_valid"].sum(axis=1), [6, 7])
    # Group 1 holds rows 3..5: row 3's four slots, row 4's slots 1 and 3, row 5's slot 0; then padding at (0, 0).
    np.testing.assert_array_equal(fields["pair_sample"][1], [0, 0, 0, 0, 1, 1, 2, 0])
    np.testing.assert_array_equal(fields["pair_slot"][1], [0, 1, 2, 3, 1, 3, 0, 0])
    np.testing.assert_array_equal(fields["pair_sample"][0], [0, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(fields["pair_slot"][0], [0, 0, 1, 0, 1, 2, 0, 0])


def test_pack_pairs_names_the_group_over_its_budget():
    with pytest.raises(ValueError, match="group 1 .* has 7 valid pairs, more than the budget of 6"):
        packing.pack_pairs(MASK, groups=2, budget=6)
    with pytest.raises(ValueError, match="does not split into 4 groups"):
        packing.pack_pairs(MASK, groups=4, budget=24)


def test_batch_pairs_needs_all_three_fields():
    assert packing.batch_pairs({"modality_mask": MASK}) is None
    fields = packing.pack_pairs(MASK, groups=3, budget=7)
    pairs = packing.batch_pairs(fields)
    assert pairs.groups == 3 and pairs.mask.shape == (21,)
    with pytest.raises(ValueError, match="needs all of"):
        packing.batch_pairs({"pair_sample": fields["pair_sample"]})


@pytest.mark.parametrize("groups, budget", [(1, 24), (2, 7), (3, 7), (6, 4)])
def test_gathers_and_sums_follow_the_pairs(groups, budget):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 4, 2, 2, 3)).astype(np.float32)
    per_sample = rng.normal(size=(6, 5)).astype(np.float32)
    fields = packing.pack_pairs(MASK, groups, budget)
    pairs = packing.PairIndex(*(jnp.asarray(fields[k]) for k in packing.PAIR_KEYS))
    rows = len(MASK) // groups
    sample = (np.arange(groups)[:, None] * rows + fields["pair_sample"]).reshape(-1)
    slot = fields["pair_slot"].reshape(-1)
    np.testing.assert_array_equal(packing.pair_images(jnp.asarray(images), pairs), images[sample, slot])
    np.testing.assert_array_equal(packing.gather_pairs(jnp.asarray(per_sample), pairs), per_sample[sample])
    per_pair = rng.normal(size=(groups * budget, 5))
    expected = np.zeros((6, 5))
    for p in np.flatnonzero(fields["pair_valid"].reshape(-1)):
        expected[sample[p]] += per_pair[p]
    np.testing.assert_allclose(packing.sum_over_pairs(jnp.asarray(per_pair), pairs, 6), expected, rtol=1e-6)


def test_full_pairs_is_the_padded_layout():
    pairs = packing.full_pairs(jnp.asarray(MASK))
    assert pairs.groups == 6 and pairs.sample.shape == (6, 4)
    np.testing.assert_array_equal(pairs.sample, 0)
    np.testing.assert_array_equal(pairs.slot, np.tile(np.arange(4), (6, 1)))
    np.testing.assert_array_equal(pairs.mask, MASK.reshape(-1))
    images = np.arange(6 * 4 * 2).reshape(6, 4, 2, 1, 1) * np.ones((1, 1, 1, 1, 3), np.float32)
    np.testing.assert_array_equal(packing.pair_images(jnp.asarray(images), pairs), images.reshape(24, 2, 1, 3))
    per_pair = np.arange(24, dtype=np.float32)
    expected = np.where(MASK, per_pair.reshape(6, 4), 0).sum(axis=1)
    np.testing.assert_array_equal(packing.sum_over_pairs(jnp.asarray(per_pair), pairs, 6), expected)
