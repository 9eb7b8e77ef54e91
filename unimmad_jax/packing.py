"""Exact pair packing (docs/model.md#pair-packing): the model computes only the (sample, slot) pairs a batch has.

A batch's pairs are split into G groups, G = the devices along the mesh's data axis: group g holds
the rows `[g * B/G, (g+1) * B/G)` of the batch, the rows that device holds, and a fixed budget of
Pg pairs.  The batch fields `pair_sample`, `pair_slot` (int32) and `pair_valid` (bool), each
`[G, Pg]`, say which: the pair's sample as a row index within its group, its slot, and whether it
is a real pair (padding entries point at (0, 0)).  Every gather and sum here stays within a group,
so that with the batch split over the data axis XLA's partitioner keeps it on its device.

`pack_pairs` is host numpy (the loaders and `serving` call it); the rest are traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAIR_KEYS = ("pair_sample", "pair_slot", "pair_valid")
"""The batch fields of a packed batch, in `PairIndex`'s order."""


class PairIndex(NamedTuple):
    """The pairs a model computes, each field `[G, Pg]` (module docstring)."""

    sample: jax.Array
    slot: jax.Array
    valid: jax.Array

    @property
    def groups(self) -> int:
        return self.sample.shape[0]

    @property
    def mask(self) -> jax.Array:
        """`[G * Pg]`: which of the flattened pairs are real."""
        return self.valid.reshape(-1)


def pack_pairs(modality_mask: np.ndarray, groups: int, budget: int) -> dict[str, np.ndarray]:
    """The batch's pair fields: each group's valid pairs in sample-major order (row, then slot), padded to `budget`.

    Raises ValueError naming the group and its count when a group has more valid pairs than `budget`.
    """
    mask = np.asarray(modality_mask, bool)
    num_samples = mask.shape[0]
    if groups <= 0 or num_samples % groups:
        raise ValueError(f"a batch of {num_samples} samples does not split into {groups} groups of equal rows")
    rows = num_samples // groups
    fields = {
        "pair_sample": np.zeros((groups, budget), np.int32),
        "pair_slot": np.zeros((groups, budget), np.int32),
        "pair_valid": np.zeros((groups, budget), bool),
    }
    for group in range(groups):
        sample, slot = np.nonzero(mask[group * rows : (group + 1) * rows])
        if len(sample) > budget:
            raise ValueError(
                f"group {group} (rows {group * rows}..{(group + 1) * rows - 1}) has {len(sample)} valid pairs, "
                f"more than the budget of {budget} pairs per group"
            )
        fields["pair_sample"][group, : len(sample)] = sample
        fields["pair_slot"][group, : len(sample)] = slot
        fields["pair_valid"][group, : len(sample)] = True
    return fields


def batch_pairs(batch: Mapping[str, Any]) -> PairIndex | None:
    """A packed batch's `PairIndex`; None for a batch without pair fields (the model then computes every slot)."""
    present = [key in batch for key in PAIR_KEYS]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"a packed batch needs all of {PAIR_KEYS}; it has {sorted(set(PAIR_KEYS) & set(batch))}")
    return PairIndex(*(batch[key] for key in PAIR_KEYS))


def full_pairs(modality_mask: jax.Array) -> PairIndex:
    """Every (sample, slot) of a `[B, S]` batch, pair `p = b * S + s`: the padded layout.

    One group per sample, so that its gathers and sums stay on the device of their sample however
    the batch is split.
    """
    num_samples, slots = modality_mask.shape
    slot = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (num_samples, slots))
    return PairIndex(jnp.zeros((num_samples, slots), jnp.int32), slot, modality_mask.astype(bool))


def grouped(per_sample: jax.Array, groups: int) -> jax.Array:
    """`[B, ...]` -> `[G, B/G, ...]`: each group's rows."""
    return per_sample.reshape(groups, per_sample.shape[0] // groups, *per_sample.shape[1:])


def gather_pairs(per_sample: jax.Array, pairs: PairIndex) -> jax.Array:
    """`per_sample [B, ...]` -> `[G * Pg, ...]`: each pair's sample's entry."""
    taken = jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0))(grouped(per_sample, pairs.groups), pairs.sample)
    return taken.reshape(-1, *per_sample.shape[1:])


def sum_over_pairs(per_pair: jax.Array, pairs: PairIndex, num_samples: int) -> jax.Array:
    """`per_pair [G * Pg, ...]` -> `[B, ...]`: each sample's sum over its valid pairs (zero for none)."""
    groups = pairs.groups
    values = per_pair.reshape(groups, -1, *per_pair.shape[1:])
    valid = pairs.valid.reshape(*pairs.valid.shape, *(1,) * (per_pair.ndim - 1))
    values = jnp.where(valid, values, 0)
    zeros = jnp.zeros((num_samples // groups, *per_pair.shape[1:]), per_pair.dtype)
    summed = jax.vmap(lambda rows, index: zeros.at[index].add(rows))(values, pairs.sample)
    return summed.reshape(num_samples, *per_pair.shape[1:])


def pair_images(specific_images: jax.Array, pairs: PairIndex) -> jax.Array:
    """`specific_images [B, S, H, W, 3]` -> `[G * Pg, H, W, 3]`: each pair's own image."""
    taken = jax.vmap(lambda rows, sample, slot: rows[sample, slot])(
        grouped(specific_images, pairs.groups), pairs.sample, pairs.slot
    )
    return taken.reshape(-1, *specific_images.shape[2:])
