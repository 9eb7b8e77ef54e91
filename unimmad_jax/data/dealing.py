"""Which device group each sample of a global batch goes to, and the pair budget that fits the groups.

A packed batch (`unimmad_jax.packing`) computes a fixed budget of (sample, slot) pairs per group,
G groups = the devices along the mesh's data axis, B/G samples each. Dealing each global batch's
samples to the groups by modality count evens out their pairs, so that one small budget fits
most batches; a batch that does not fit runs with an overflow budget, and one that does not fit
that either with the full budget, B/G x num_slots, which fits every batch. The two smaller budgets
minimise the expected pair compute over simulated class-balanced draws, a function of the
training records and the batch layout alone (docs/scale.md#padded-modality-slots).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

_SIMULATED_BATCHES = 1024
_SIMULATION_SEED = 0  # the budget is part of the run's configuration: no run seed moves it


def class_balanced_probabilities(class_keys: Sequence[tuple[str, str]]) -> np.ndarray:
    """Each record's draw probability: 1 / (number of classes * size of its class)."""
    _, class_ids, class_sizes = np.unique(
        np.array([f"{d}\0{c}" for d, c in class_keys]), return_inverse=True, return_counts=True
    )
    probabilities = 1.0 / class_sizes[class_ids]
    return probabilities / probabilities.sum()


def deal_by_modality_count(counts: np.ndarray, groups: int) -> np.ndarray:
    """The order `[M, N]` of each global batch of `counts [M, N]` (modality counts) that deals it to `groups` groups.

    Group g is positions [g * N/G, (g+1) * N/G) of the order; every group gets N/G samples, in draw
    order within the group, so that one group keeps the batch's order. The samples off the
    batches' most common count go first, the largest excess first, each to the group with the
    fewest pairs, then the largest deficit first, each to the group with the most (greedy number
    partitioning); the samples of the most common count fill the rows left.
    """
    counts = np.asarray(counts, np.int64)
    num_batches, size = counts.shape
    if groups <= 0 or size % groups:
        raise ValueError(f"a global batch of {size} samples does not split into {groups} groups of equal size")
    rows = size // groups
    values, frequencies = np.unique(counts, return_counts=True)
    deviation = counts - values[frequencies.argmax()]
    # Excess in decreasing order, then deficits from the largest, then the usual count; draw order within ties.
    last = np.abs(deviation).max(initial=0) + 1
    rank = np.where(deviation > 0, -deviation, np.where(deviation < 0, last + deviation, last))
    order = np.argsort(rank, axis=1, kind="stable")
    group = np.full((num_batches, size), -1, np.int64)
    pairs = np.zeros((num_batches, groups), np.int64)
    filled = np.zeros((num_batches, groups), np.int64)
    batch = np.arange(num_batches)
    limit = np.iinfo(np.int64).max
    for position in range(int((deviation != 0).sum(axis=1).max(initial=0))):
        sample = order[:, position]
        change = deviation[batch, sample]
        room = filled < rows
        fewest = np.where(room, pairs, limit).argmin(axis=1)
        most = np.where(room, pairs, -limit).argmax(axis=1)
        target = np.where(change > 0, fewest, most)
        dealt = change != 0
        pairs[batch[dealt], target[dealt]] += change[dealt]
        filled[batch[dealt], target[dealt]] += 1
        group[batch[dealt], sample[dealt]] = target[dealt]
    for index in range(num_batches):
        group[index, group[index] < 0] = np.repeat(np.arange(groups), rows - filled[index])
    return np.argsort(group * size + np.arange(size), axis=1, kind="stable")


def group_pairs(counts: np.ndarray, groups: int) -> np.ndarray:
    """`[M, G]`: the valid pairs of each group of dealt global batches `counts [M, N]`."""
    counts = np.asarray(counts)
    return counts.reshape(counts.shape[0], groups, -1).sum(axis=-1)


@dataclasses.dataclass(frozen=True)
class PairBudget:
    """Pairs per group of the packed steps: the budget, the overflow budget and the full one.

    Attributes:
      pairs: the packed step's budget per group.
      overflow: the budget of a batch that does not fit `pairs` (at most `full`).
      full: samples per group * num_slots, the budget of a batch that fits neither.
      overflow_rate: the share of simulated global batches that do not fit `pairs`.
      expected_waste: 1 - valid pairs / pairs computed, expected over steps.
    """

    pairs: int
    overflow: int
    full: int
    overflow_rate: float
    expected_waste: float

    def for_batch(self, most_pairs: int) -> int:
        """The budget of a global batch whose fullest group has `most_pairs` pairs."""
        return next(budget for budget in (self.pairs, self.overflow, self.full) if most_pairs <= budget)


def choose_pair_budget(
    class_keys: Sequence[tuple[str, str]],
    modality_counts: np.ndarray,
    global_batch_size: int,
    groups: int,
    num_slots: int,
) -> PairBudget:
    """The budget and overflow budget per group that minimise the expected pairs computed per step (`PairBudget`).

    Simulates global batches of class-balanced draws of the records (`class_keys`, their
    `modality_counts`), deals each (`deal_by_modality_count`) and weighs every candidate pair of
    budgets' padding against the steps of the batches that fit only the larger or neither. A
    third budget costs one more compile, once, and pays where two leave much padding: at 8
    samples a group, a group with a 4-modality sample fits 16 pairs only beside two 1-modality ones.
    """
    counts = np.asarray(modality_counts, np.int64)
    probabilities = class_balanced_probabilities(class_keys)
    values = np.unique(counts)
    value_probabilities = np.array([probabilities[counts == value].sum() for value in values])
    rng = np.random.default_rng(_SIMULATION_SEED)
    drawn = rng.choice(values, size=(_SIMULATED_BATCHES, global_batch_size), p=value_probabilities)
    order = deal_by_modality_count(drawn, groups)
    most = group_pairs(np.take_along_axis(drawn, order, axis=1), groups).max(axis=1)
    full = global_batch_size // groups * num_slots
    candidates = np.arange(1, full + 1)
    fits = (most[None, :] <= candidates[:, None]).mean(axis=1)
    # computed[i, j]: budget candidates[i], overflow budget candidates[j] (j >= i), then the full one.
    computed = (
        candidates[:, None] * fits[:, None]
        + candidates[None, :] * (fits[None, :] - fits[:, None])
        + full * (1 - fits[None, :])
    )
    computed = np.where(candidates[None, :] >= candidates[:, None], computed, np.inf)
    # Ties go to the larger budgets: a budget that every simulated batch fits needs no overflow budget below full.
    best, overflow = (full - 1 - i for i in np.unravel_index(np.argmin(computed[::-1, ::-1]), computed.shape))
    valid = global_batch_size * float(value_probabilities @ values) / groups
    return PairBudget(
        pairs=int(candidates[best]),
        overflow=int(candidates[overflow]),
        full=full,
        overflow_rate=float(1 - fits[best]),
        expected_waste=float(1 - valid / computed[best, overflow]),
    )


def eval_pair_budget(modality_counts: np.ndarray, batch_size: int, process_count: int, groups: int) -> int:
    """The least budget per group that fits every batch of an evaluation split read in order.

    `modality_counts` are the split's, in reading order; each of the `process_count` hosts reads
    batches of `batch_size` rows in `groups` groups, the last batch padded with the last sample.
    """
    counts = np.asarray(modality_counts, np.int64)
    span = batch_size * process_count
    padded = counts[np.minimum(np.arange(-(-len(counts) // span) * span), len(counts) - 1)]
    return int(padded.reshape(-1, batch_size // groups).sum(axis=1).max())


def training_records(config: ml_collections.ConfigDict) -> tuple[list[tuple[str, str]], np.ndarray, str]:
    """(dataset, class) and modality count of every training record of `config.data`, and where they come from.

    From the prepared indexes when every dataset is prepared in `config.data.data_dir`, else from
    what the builders declare (`builders.declared_train_classes`): nothing is read but indexes.
    """
    from unimmad_jax.data import builders
    from unimmad_jax.data.prepared import find_prepared, read_index

    data = config.data
    folders = find_prepared(data.data_dir)
    keys, counts = [], []
    if all(name in folders for name in data.datasets):
        for name in data.datasets:
            index = read_index(folders[name]).splits["train"]
            wanted = data.classes.get(name)
            for class_name, types in zip(index.class_names, index.modality_types):
                if wanted is None or class_name in wanted:
                    keys.append((name, class_name))
                    counts.append(len(types))
        return keys, np.array(counts, np.int64), f"the prepared indexes in {data.data_dir}"
    sources = []
    for name in data.datasets:
        classes, source = builders.declared_train_classes(name)
        sources.append(f"{name}: {source}")
        wanted = data.classes.get(name, tuple(classes))
        for class_name, declared in classes.items():
            if class_name in wanted:
                keys += [(name, class_name)] * declared.samples
                counts += [declared.modalities] * declared.samples
    return keys, np.array(counts, np.int64), "the builders' declarations (" + "; ".join(sources) + ")"
