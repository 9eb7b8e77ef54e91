"""Grain pipelines from prepared datasets to fixed-shape batches (docs/data.md#the-batch).

Every batch is a dict of numpy arrays (channels last), for a per-host batch
size ``B``, ``S = config.num_slots`` and ``H = W = config.image_size``:

- ``specific_images`` float32 ``[B, S, H, W, 3]``: each modality preprocessed
  by type (`unimmad_jax.data.preprocess`); slots past the sample's modality
  count are zero.
- ``modality_mask`` bool ``[B, S]``: True for the sample's slots (the first).
- ``loss_weight`` float32 ``[B]``: ``config.loss_weights[<record's dataset>]``
  (1 for datasets not listed).
- ``gt_mask`` float32 ``[B, H, W]`` in {0, 1}: the resized ground truth at
  evaluation, zeros in training.
- ``label`` int32 ``[B]``: 0 good, 1 anomalous.
- host-only metadata: ``dataset``, ``class_name``, ``defect_type``, ``path``,
  ``modality_types`` (comma-separated, in slot order) (numpy unicode ``[B]``)
  and ``valid`` bool ``[B]`` (False for the padding
  rows of the last evaluation batch, which repeat the split's last sample).
- with ``pack_pairs``: ``pair_sample``, ``pair_slot`` int32 and ``pair_valid``
  bool ``[G_local, Pg]``, the (sample, slot) pairs the model computes
  (`unimmad_jax.packing`), G_local = this host's groups (devices along the
  data axis), Pg = the batch's pair budget per group (`dealing.PairBudget`).

``config`` is ``config.data`` of the project's configs, as made by
`default_data_config`:

- ``data_dir``: where prepared datasets live (``prepare --data-dir``).
- ``datasets``: names of the prepared datasets to train on, e.g.
  ``('mvtec3d', 'eyecandies', 'mmad_meta/brats', 'folder/my_parts')``.
- ``classes``: optional ``{dataset name: (class, ...)}``; a dataset not listed
  uses all its classes.
- ``image_size``: H = W of every modality and mask: a reference to the
  model's ``config.image_size`` (`unimmad_jax.config`), set by its owner.
- ``num_slots``: modality slots S (1..4), at least the largest modality count
  of the samples read.
- ``loss_weights``: ``{record dataset: weight}``, keyed by the records'
  ``dataset`` field (``brats`` for ``mmad_meta/brats``, the full name for
  ``folder/<name>``); the release's weights by default, 1 for a dataset not
  listed (a folder dataset unless you list it).
- ``replay_classes``: optional ``{dataset name: (class, ...)}`` of earlier
  tasks (continual learning) of which training draws only the first
  ``replay_per_class`` records of each class, beside ``datasets``.
- ``pack_pairs``: batches carry their valid (sample, slot) pairs, so that
  padded slots cost no pair compute. Training deals each global batch's
  samples to the groups by modality count (`dealing.deal_by_modality_count`)
  and packs it to the run's pair budget, or to a larger one when it does
  not fit (`dealing.PairBudget`); evaluation packs every batch of a split to one budget that fits
  them all. False: no pair fields, every slot computed.
- ``num_read_threads``: threads reading and preprocessing (0: in the caller).
- ``prefetch_batches``: batches read ahead per host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from unimmad_jax import packing
from unimmad_jax.data import preprocess, schema
from unimmad_jax.data.dealing import (
    PairBudget,
    choose_pair_budget,
    class_balanced_probabilities,
    deal_by_modality_count,
    eval_pair_budget,
    group_pairs,
)
from unimmad_jax.data.prepared import PreparedSplit, open_split
from unimmad_jax.data.schema import InvalidDataError

Batch = dict[str, np.ndarray]

DEFAULT_LOSS_WEIGHTS = {
    "eyecandies": 0.5,
    "mvtec3d": 1.0,
    "mulsen_ad": 1.0,
    "brats": 10.0,
    "retinaad": 1.0,
    "liverad": 10.0,
    "hyperad": 1.0,
}


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` with the defaults documented in this module; `image_size` is the caller's to set."""
    config = ml_collections.ConfigDict()
    config.data_dir = "~/tensorflow_datasets"
    config.datasets = ("synthetic",)
    config.classes = ml_collections.ConfigDict()
    config.num_slots = 2
    config.loss_weights = ml_collections.ConfigDict(DEFAULT_LOSS_WEIGHTS)
    config.replay_classes = ml_collections.ConfigDict()
    config.replay_per_class = 0
    config.pack_pairs = True
    config.num_read_threads = 8
    config.prefetch_batches = 4
    return config


@dataclasses.dataclass(frozen=True)
class _Catalog:
    """Several prepared splits seen as one list of records."""

    splits: tuple[PreparedSplit, ...]
    local_indices: tuple[np.ndarray, ...]  # the records kept of each split

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(kept) for kept in self.local_indices])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, position: int) -> tuple[PreparedSplit, int]:
        part = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.splits[part], int(self.local_indices[part][position - self.offsets[part]])

    @functools.cached_property
    def modality_counts(self) -> np.ndarray:
        """The number of modalities of every record."""
        return np.array(
            [len(split.index.modality_types[i]) for split, kept in zip(self.splits, self.local_indices) for i in kept],
            np.int64,
        )

    @functools.cached_property
    def class_keys(self) -> list[tuple[str, str]]:
        """(dataset name, class) of every record."""
        return [
            (split.name, split.index.class_names[i])
            for split, kept in zip(self.splits, self.local_indices)
            for i in kept
        ]


def _open_catalog(config, names: Sequence[str], split: str, classes=None) -> _Catalog:
    """The records of `split` of each dataset, restricted to the chosen classes."""
    splits, kept = [], []
    for name in names:
        prepared = open_split(config.data_dir, name, split)
        wanted = classes if classes is not None else config.classes.get(name)
        _check_classes(prepared, wanted, "config.data.classes")
        indices = np.array(
            [i for i, c in enumerate(prepared.index.class_names) if wanted is None or c in wanted],
            np.int64,
        )
        _check_slots(prepared, indices, config.num_slots)
        splits.append(prepared)
        kept.append(indices)
    return _Catalog(tuple(splits), tuple(kept))


def _check_classes(prepared: PreparedSplit, wanted, where: str) -> None:
    available = prepared.index.class_names
    unknown = sorted(set(wanted or ()) - set(available))
    if unknown:
        raise InvalidDataError(
            f"Classes {unknown} ({where}) are not in {prepared.name}/{prepared.split}; it has {sorted(set(available))}."
        )


def _with_replay(config, catalog: _Catalog) -> _Catalog:
    """`catalog` and the first `config.replay_per_class` training records of each class of `config.replay_classes`."""
    if config.replay_per_class <= 0 or not config.replay_classes:
        return catalog
    splits, kept = list(catalog.splits), list(catalog.local_indices)
    for name, replayed in config.replay_classes.items():
        prepared = open_split(config.data_dir, name, "train")
        _check_classes(prepared, replayed, "config.data.replay_classes")
        class_names = np.asarray(prepared.index.class_names)
        indices = np.concatenate(
            [np.flatnonzero(class_names == c)[: config.replay_per_class] for c in replayed] or [np.zeros(0, np.int64)]
        )
        _check_slots(prepared, indices, config.num_slots)
        splits.append(prepared)
        kept.append(indices.astype(np.int64))
    return _Catalog(tuple(splits), tuple(kept))


def _check_slots(prepared: PreparedSplit, indices: np.ndarray, num_slots: int) -> None:
    if not 1 <= num_slots <= schema.MAX_MODALITIES:
        raise InvalidDataError(f"config.data.num_slots is {num_slots}; expected 1 to {schema.MAX_MODALITIES}.")
    most = max((len(prepared.index.modality_types[i]) for i in indices), default=0)
    if most > num_slots:
        raise InvalidDataError(
            f"{prepared.name}/{prepared.split} has samples with {most} modalities "
            f"but config.data.num_slots is {num_slots}."
        )


@dataclasses.dataclass(frozen=True)
class _SampleReader:
    """Reads and preprocesses one record into the per-sample batch fields, padded to `num_slots` slots."""

    catalog: _Catalog
    image_size: int
    loss_weights: Mapping[str, float]
    with_masks: bool

    def __call__(self, position: int, num_slots: int) -> dict[str, np.ndarray]:
        split, index = self.catalog.locate(position)
        example = split.records[index]
        path = schema.decode_text(example["path"])
        try:
            return self._sample(split, example, path, num_slots)
        except InvalidDataError as error:
            raise InvalidDataError(f"{split.name}/{split.split} record {index} ({path}): {error}") from error

    def _sample(self, split: PreparedSplit, example: Mapping[str, Any], path: str, num_slots: int):
        size = self.image_size
        specific = np.zeros((num_slots, size, size, 3), np.float32)
        slots = schema.modality_slots(example)
        for slot, (modality_type, array) in enumerate(slots):
            specific[slot] = preprocess.preprocess_modality(array, modality_type, size)
        if self.with_masks:
            gt_mask = preprocess.preprocess_mask(example["mask"], size)
        else:
            gt_mask = np.zeros((size, size), np.float32)
        return {
            "specific_images": specific,
            "modality_mask": np.arange(num_slots) < len(slots),
            "loss_weight": np.float32(self.loss_weights.get(split.dataset, 1.0)),
            "gt_mask": gt_mask,
            "label": np.int32(example["label"]),
            "dataset": np.str_(schema.decode_text(example["dataset"])),
            "class_name": np.str_(schema.decode_text(example["class_name"])),
            "defect_type": np.str_(schema.decode_text(example["defect_type"])),
            "path": np.str_(path),
            "modality_types": np.str_(",".join(t for t, _ in slots)),
            "valid": np.bool_(True),
        }


def _stack(samples: Sequence[dict[str, np.ndarray]]) -> Batch:
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def _read_options(config) -> grain.ReadOptions:
    threads = int(config.num_read_threads)
    return grain.ReadOptions(
        num_threads=threads,
        prefetch_buffer_size=int(config.prefetch_batches) if threads else 0,
    )


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count}).")
    return index, count


def _global_position(step: int, row: int, batch_size: int, process_index: int, process_count: int) -> int:
    """Where row `row` of this host's batch `step` sits in the global order.

    Global batch `step` is positions [step * G, (step + 1) * G), G = batch_size
    * process_count; host p takes its p-th block of batch_size rows.
    """
    return (step * process_count + process_index) * batch_size + row


class BalancedDraws:
    """The global training batches of every epoch: which records, in which order, and their pair budgets.

    Epoch e draws as many records as there are, with replacement, record i with probability
    1 / (number of classes * size of i's class), from a generator seeded by (seed, e). Its
    `steps_per_epoch` global batches of N = `global_batch_size` records are its first draws in
    order; with `groups`, each batch dealt to the groups (`deal_by_modality_count`: the same
    records in another order) and packed to `pair_budget` pairs per group, or to its overflow or
    full budget when a group has more pairs (`PairBudget.for_batch`).
    """

    def __init__(
        self,
        class_keys: Sequence[tuple[str, str]],
        modality_counts: np.ndarray,
        seed: int,
        global_batch_size: int,
        num_slots: int,
        groups: int | None,
    ):
        self.probabilities = class_balanced_probabilities(class_keys)
        self.modality_counts = np.asarray(modality_counts)
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = len(class_keys) // global_batch_size
        self.groups = groups
        self.pair_budget: PairBudget | None = None
        if groups is not None and self.steps_per_epoch:
            self.pair_budget = choose_pair_budget(
                class_keys, self.modality_counts, global_batch_size, groups, num_slots
            )

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one sampler per run: keeping it alive costs nothing)
    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The record positions `[steps_per_epoch, N]` of `epoch`'s global batches and their pair budgets per group.

        The budgets `[steps_per_epoch]` are None without `groups`.
        """
        rng = np.random.default_rng([self.seed, epoch])
        size = len(self.probabilities)
        draws = rng.choice(size, size=size, replace=True, p=self.probabilities)
        batches = draws[: self.steps_per_epoch * self.global_batch_size].reshape(self.steps_per_epoch, -1)
        if self.pair_budget is None:
            return batches, None
        batches = np.take_along_axis(batches, deal_by_modality_count(self.modality_counts[batches], self.groups), 1)
        most = group_pairs(self.modality_counts[batches], self.groups).max(axis=1)
        return batches, np.array([self.pair_budget.for_batch(pairs) for pairs in most])


def _host_reads(draws: BalancedDraws, batch_size: int, process_index: int, process_count: int):
    """This host's sample counter -> record position, epoch after epoch."""

    def read(counter: int) -> int:
        step, row = divmod(counter, batch_size)
        epoch, step_in_epoch = divmod(step, draws.steps_per_epoch)
        batches, _ = draws.epoch(epoch)
        return int(batches.reshape(-1)[_global_position(step_in_epoch, row, batch_size, process_index, process_count)])

    return read


def _step_budget(draws: BalancedDraws, step: int) -> int:
    epoch, step_in_epoch = divmod(step, draws.steps_per_epoch)
    return int(draws.epoch(epoch)[1][step_in_epoch])


@dataclasses.dataclass(frozen=True)
class TrainLoader:
    """Class-balanced training batches, epoch after epoch, never ending.

    Attributes:
      iterator: a grain `DatasetIterator` of this host's batches; its position is
        the global step (`seek`), whatever the number of hosts, so a resumed run
        reads exactly the batch that followed the last one trained on.
      steps_per_epoch: floor(epoch_size / global_batch_size), the same on every
        host; epoch e is global steps [e * steps_per_epoch, (e + 1) * ...).
      epoch_size: training records of all datasets (draws per epoch).
      global_batch_size: per-host batch size * process count.
      draws: the global batches (`BalancedDraws`); its `pair_budget` is None
        without `pack_pairs`.
    """

    iterator: grain.DatasetIterator
    steps_per_epoch: int
    epoch_size: int
    global_batch_size: int
    draws: BalancedDraws

    def seek(self, step: int) -> None:
        """The next batch is this host's share of global step `step`."""
        grain.experimental.set_next_index(self.iterator, step)

    @property
    def pair_budget(self) -> int | None:
        """The pairs per group of a batch that fits the budget; None without packing."""
        return None if self.draws.pair_budget is None else self.draws.pair_budget.pairs

    def overflow_steps(self, epoch: int) -> int:
        """The steps of `epoch` whose batch does not fit the pair budget and runs with a larger one."""
        budgets = self.draws.epoch(epoch)[1]
        return 0 if budgets is None else int((budgets != self.draws.pair_budget.pairs).sum())


def first_training_images(config: ml_collections.ConfigDict, *, seed: int, batch_size: int) -> np.ndarray:
    """The valid modality images `[n, H, W, 3]` of the first global training batch of `batch_size` samples.

    Read whole on every host, whatever the number of hosts and devices (one group: the draw order),
    so that what is computed from them is a function of the config alone.
    """
    loader = train_loader(config, seed=seed, batch_size=batch_size, groups=1, process_index=0, process_count=1)
    batch = next(loader.iterator)
    return batch["specific_images"][batch["modality_mask"]]


def train_loader(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    batch_size: int,
    groups: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainLoader:
    """Training batches over the train splits of `config.datasets`.

    Args:
      config: `config.data` (see module docstring).
      seed: the global seed; the draws of epoch e depend on (seed, e) only.
      batch_size: per-host batch size B.
      groups: the pair groups of a global batch, the devices along the mesh's data axis (all hosts).
      process_index: this host (default `jax.process_index()`).
      process_count: hosts (default `jax.process_count()`).
    """
    process_index, process_count = _hosts(process_index, process_count)
    catalog = _with_replay(config, _open_catalog(config, config.datasets, "train"))
    global_batch_size = batch_size * process_count
    local_groups = host_groups(groups, batch_size, process_count)
    draws = BalancedDraws(
        catalog.class_keys,
        catalog.modality_counts,
        seed,
        global_batch_size,
        config.num_slots,
        groups=groups if config.pack_pairs else None,
    )
    if draws.steps_per_epoch == 0:
        raise InvalidDataError(
            f"The global batch size {global_batch_size} exceeds the {len(catalog)} "
            f"training samples of {tuple(config.datasets)}."
        )
    read = _host_reads(draws, batch_size, process_index, process_count)
    reader = _SampleReader(catalog, config.image_size, dict(config.loss_weights), with_masks=False)
    batches = (
        grain.MapDataset.range(sys.maxsize)
        .map(lambda counter: reader(read(counter), config.num_slots))
        .batch(batch_size, drop_remainder=True, batch_fn=_stack)
    )
    if config.pack_pairs:
        batches = batches.map_with_index(
            lambda step, batch: _with_pairs(batch, local_groups, _step_budget(draws, step))
        )
    iterator = iter(batches.to_iter_dataset(_read_options(config)))
    return TrainLoader(iterator, draws.steps_per_epoch, len(catalog), global_batch_size, draws)


def host_groups(groups: int, batch_size: int, process_count: int) -> int:
    """This host's share of the `groups` pair groups (of its `batch_size` rows); every group has the same rows."""
    if groups <= 0 or groups % process_count or batch_size % (groups // process_count):
        raise ValueError(
            f"{groups} pair groups (devices along the data axis) do not split over {process_count} hosts "
            f"of {batch_size} samples each into groups of equal rows"
        )
    return groups // process_count


def _with_pairs(batch: Batch, groups: int, budget: int) -> Batch:
    return {**batch, **packing.pack_pairs(batch["modality_mask"], groups, budget)}


@dataclasses.dataclass(frozen=True)
class EvalLoader:
    """Batches of one split in a fixed order; iterate it as often as needed.

    Attributes:
      num_batches: batches per host (the same on every host).
      num_examples: real samples of the split (over all hosts).
    """

    batches: grain.MapDataset
    read_options: grain.ReadOptions
    num_batches: int
    num_examples: int

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches.to_iter_dataset(self.read_options))


def eval_loader(
    config: ml_collections.ConfigDict,
    dataset: str,
    split: str = "test",
    *,
    batch_size: int,
    groups: int = 1,
    classes: Sequence[str] | None = None,
    shard_by_host: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalLoader:
    """Evaluation batches of `split` of prepared dataset `dataset`.

    Records come in their prepared order (grouped by class), with ground-truth
    masks. The last batch is padded to `batch_size` with `valid=False` rows.

    Args:
      config: `config.data` (see module docstring).
      dataset: a prepared dataset name, e.g. 'mvtec3d' or 'mmad_meta/brats'.
      split: 'train', 'validation' or 'test'.
      batch_size: per-host batch size.
      groups: the pair groups of a batch over all the hosts it is split over, the devices along the
        mesh's data axis.
      classes: the classes to keep (default: `config.classes[dataset]`, else all).
      shard_by_host: split the samples over hosts (each gets the same number of
        batches) instead of giving every host all of them.
      process_index: this host (default `jax.process_index()`).
      process_count: hosts (default `jax.process_count()`).
    """
    if shard_by_host:
        process_index, process_count = _hosts(process_index, process_count)
    else:
        process_index, process_count = 0, 1
    catalog = _open_catalog(config, [dataset], split, classes)
    num_examples = len(catalog)
    if num_examples == 0:
        raise InvalidDataError(f"{dataset}/{split} has no samples of classes {classes}.")
    num_batches = math.ceil(num_examples / (batch_size * process_count))
    reader = _SampleReader(catalog, config.image_size, dict(config.loss_weights), with_masks=True)

    def read(counter: int) -> dict[str, np.ndarray]:
        step, row = divmod(counter, batch_size)
        position = _global_position(step, row, batch_size, process_index, process_count)
        sample = reader(min(position, num_examples - 1), config.num_slots)
        sample["valid"] = np.bool_(position < num_examples)
        return sample

    batches = (
        grain.MapDataset.range(num_batches * batch_size)
        .map(read)
        .batch(batch_size, drop_remainder=True, batch_fn=_stack)
    )
    if config.pack_pairs:
        local_groups = host_groups(groups, batch_size, process_count)
        budget = eval_pair_budget(catalog.modality_counts, batch_size, process_count, local_groups)
        batches = batches.map(lambda batch: _with_pairs(batch, local_groups, budget))
    return EvalLoader(batches, _read_options(config), num_batches, num_examples)
