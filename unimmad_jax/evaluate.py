"""Batched evaluation: per-sample maps and scores, and the metrics per class and dataset (docs/model.md#metrics)."""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from unimmad_jax import anomaly_map, metrics, packing, report, sharding
from unimmad_jax.config import eval_datasets
from unimmad_jax.data import eval_loader
from unimmad_jax.data.prepared import class_modalities, max_modality_count
from unimmad_jax.data.schema import MODALITY_TYPES
from unimmad_jax.models.unimmad import UniMMAD

REGION_KEYS = ("region_ids", "region_counts")
POOLED_METRICS = ("i_auroc", "p_auroc")


def score_step(
    model: UniMMAD, variables: dict, images: jax.Array, mask: jax.Array, pairs: packing.PairIndex | None = None
) -> dict[str, jax.Array]:
    """Eval-mode maps of a batch: `anomaly_map_raw`, `anomaly_map` (blurred) `[B, H, W]`, `image_score [B]`.

    `pairs`: a packed batch's (`packing.batch_pairs`); None runs every slot.
    """
    out = model.apply(variables, images, mask, train=False, pairs=pairs)
    raw = anomaly_map.raw_anomaly_map(out, images.shape[0], model.config.image_size)
    blurred = anomaly_map.blur(raw)
    return {"anomaly_map_raw": raw, "anomaly_map": blurred, "image_score": anomaly_map.image_score(blurred)}


@functools.cache  # one compiled step a model and mesh, whichever evaluations of a process use it
def make_score_fn(model: UniMMAD, mesh: Mesh):
    """`score_step` compiled for the mesh: variables replicated, the batch split over devices."""
    split = sharding.batch_split(mesh)
    return jax.jit(
        functools.partial(sharding.traced_on(mesh, score_step), model),
        in_shardings=(sharding.replicated(mesh), split, split, split),
        out_shardings=split,
    )


def evaluate_dataset(
    score_fn, variables: dict, config: ml_collections.ConfigDict, dataset: str, mesh: Mesh, progress: bool = True
) -> dict[str, dict[str, float]]:
    """`{class: metrics}` of one prepared dataset's evaluation split, the same on every host."""
    return per_class_metrics(score_split(score_fn, variables, config, dataset, config.eval.split, mesh, progress))


@dataclasses.dataclass
class ScoredSplit:
    """One split's scores: `columns` of its samples on every host (`image_score`, `label`, `class_name`),
    and per batch, on the devices that computed them, the maps with the ground truth's regions.

    `batches` holds global arrays split over the mesh: `anomaly_map [B, H, W]`, `region_ids [B, H, W]`
    and `region_counts [B]` (`metrics.region_ids_per_image` of the masks); `batch_class_names` and
    `batch_valid` say, on every host, which class each of a batch's rows holds and whether it is a sample.
    """

    mesh: Mesh
    batches: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    batch_class_names: list[np.ndarray] = dataclasses.field(default_factory=list)
    batch_valid: list[np.ndarray] = dataclasses.field(default_factory=list)
    collected: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=lambda: defaultdict(list))

    def add(self, out: dict[str, jax.Array], batch: dict[str, np.ndarray]) -> None:
        """One batch: `out`, `score_step`'s global arrays; `batch`, this process's rows of `gt_mask`, `label`,
        `valid` and `class_name`."""
        region_ids, region_counts = metrics.region_ids_per_image(batch["gt_mask"])
        regions = sharding.to_global({"region_ids": region_ids, "region_counts": region_counts}, self.mesh, REGION_KEYS)
        self.batches.append({"anomaly_map": out["anomaly_map"], **regions})
        rows = sharding.gather({"image_score": out["image_score"], "label": batch["label"], "valid": batch["valid"]})
        rows["class_name"] = sharding.gather_text(batch["class_name"])
        valid = rows.pop("valid").astype(bool)
        self.batch_class_names.append(rows["class_name"])
        self.batch_valid.append(valid)
        for key, value in rows.items():
            self.collected[key].append(value[valid])

    @property
    def columns(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(values) for key, values in self.collected.items()}


def score_split(
    score_fn,
    variables: dict,
    config: ml_collections.ConfigDict,
    dataset: str,
    split: str,
    mesh: Mesh,
    progress: bool = True,
    classes: list[str] | None = None,
    modalities: frozenset[str] | None = None,
) -> ScoredSplit:
    """Every sample's image score, label and class name of one split on every process, the maps left on the
    devices: each process reads and runs its share of every batch.

    Batches carry only as many modality slots as the dataset's samples have: the model never runs
    on slots that are padding for every sample (a single-modality dataset runs one slot).

    Args:
      classes: the classes to score (default: those of `config.data.classes`, else all).
      modalities: the modality types the model sees (default: all of each sample's; `keep_modalities`).
    """
    batch_size = sharding.per_host_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    data_config = config.data.copy_and_resolve_references()
    data_config.num_slots = max_modality_count(config.data.data_dir, dataset, split)
    loader = eval_loader(
        data_config,
        dataset,
        split,
        batch_size=batch_size,
        classes=classes,
        groups=mesh.shape[sharding.DATA_AXIS],
        shard_by_host=True,
    )
    scored = ScoredSplit(mesh)
    progress = progress and sharding.is_main_process()
    for batch in tqdm(loader, total=loader.num_batches, desc=f"eval {dataset}", disable=not progress, leave=False):
        if modalities is not None:
            batch = keep_modalities(batch, modalities)
        inputs = sharding.to_global(batch, mesh, sharding.MODEL_KEYS)
        out = score_fn(variables, inputs["specific_images"], inputs["modality_mask"], packing.batch_pairs(inputs))
        scored.add(out, batch)
    return scored


def keep_modalities(batch: dict[str, np.ndarray], modalities: frozenset[str]) -> dict[str, np.ndarray]:
    """`batch` with only the slots of `modalities` kept, each in its own slot: the others are marked missing in
    `modality_mask` and zeroed, as the slots a sample never had."""
    num_slots = batch["modality_mask"].shape[1]
    slot_types = [str(types).split(",") for types in batch["modality_types"]]
    kept = np.array(
        [[slot < len(types) and types[slot] in modalities for slot in range(num_slots)] for types in slot_types]
    )
    kept &= batch["modality_mask"]
    return {
        **batch,
        "modality_mask": kept,
        "specific_images": np.where(kept[:, :, None, None, None], batch["specific_images"], 0),
    }


def per_class_metrics(scored: ScoredSplit) -> dict[str, dict[str, float]]:
    """`{class: metrics}` of `score_split`'s split, classes in dataset order."""
    columns = scored.columns
    return {
        name: _metrics_of_class(scored, columns, name)
        for name in dict.fromkeys(columns["class_name"])  # classes in dataset order
    }


def pooled_metrics(scored: ScoredSplit) -> dict[str, float]:
    """`POOLED_METRICS` of `score_split`'s split: the scores of all its classes in one curve.

    A dataset's pooled AUROC ranks every class's scores against each other, so it also measures whether one
    threshold serves all classes; the mean of per-class values does not (docs/model.md#metrics).
    """
    columns = scored.columns
    values = _metrics_of_class(scored, columns, None)
    return {name: values[name] for name in POOLED_METRICS}


def _metrics_of_class(scored: ScoredSplit, columns: dict, class_name: str | None) -> dict[str, float]:
    """`metrics.compute_metrics` of the samples of class `class_name` (None: of every class) of `scored`.

    The pixel metrics are computed over the batches holding the samples: by the host from the maps when one
    process holds all of them on a CPU (numpy's sorts are the fastest there), otherwise on the devices, only
    scalars coming back.
    """
    selected = columns["class_name"] == class_name if class_name is not None else slice(None)
    labels, scores = columns["label"][selected], columns["image_score"][selected]
    rows = [
        valid & (names == class_name) if class_name is not None else valid
        for names, valid in zip(scored.batch_class_names, scored.batch_valid)
    ]
    held = [index for index, batch_rows in enumerate(rows) if batch_rows.any()]
    batches = [scored.batches[index] for index in held]
    if _metrics_on_host(scored.mesh):
        maps = np.concatenate([np.asarray(batch["anomaly_map"])[rows[i]] for i, batch in zip(held, batches)])
        masks = np.concatenate([np.asarray(batch["region_ids"])[rows[i]] > 0 for i, batch in zip(held, batches)])
        return metrics.compute_metrics(labels, scores, masks, maps)
    row_split = sharding.batch_split(scored.mesh)
    on_devices = [
        jax.make_array_from_callback(rows[i].shape, row_split, lambda index, batch_rows=rows[i]: batch_rows[index])
        for i in held
    ]
    return metrics.metrics_on_devices(
        labels.astype(bool),
        scores,
        [batch["anomaly_map"] for batch in batches],
        [batch["region_ids"] for batch in batches],
        [batch["region_counts"] for batch in batches],
        on_devices,
    )


def _metrics_on_host(mesh: Mesh) -> bool:
    return jax.process_count() == 1 and mesh.devices.flat[0].platform == "cpu"


def evaluate(
    model: UniMMAD,
    variables: dict,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    progress: bool = True,
    score_fn: Callable | None = None,
) -> dict:
    """The metrics summary (`report.summarize_metrics`) over every evaluation dataset, with its pooled metrics;
    `score_fn`: `make_score_fn`'s, or a wrapper of it (training's, that a preemption notice stops)."""
    score_fn = score_fn or make_score_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    results, pooled = {}, {}
    for dataset in eval_datasets(config):
        scored = score_split(score_fn, variables, config, dataset, config.eval.split, mesh, progress)
        results[dataset], pooled[dataset] = per_class_metrics(scored), pooled_metrics(scored)
    return report.summarize_metrics(results, pooled)


def modality_subsets(config: ml_collections.ConfigDict) -> dict[str, frozenset[str]]:
    """`config.eval.modality_subsets` as `{subset: modality types}`, e.g. `"rgb+depth"` -> `{"rgb", "depth"}`."""
    subsets = {}
    for subset in config.eval.modality_subsets:
        modalities = frozenset(subset.split("+"))
        unknown = sorted(modalities - set(MODALITY_TYPES))
        if unknown:
            raise ValueError(
                f"config.eval.modality_subsets: {subset!r} names unknown modalities {unknown}; known: "
                f"{', '.join(MODALITY_TYPES)}, joined by '+' (e.g. 'rgb+depth')"
            )
        subsets[subset] = modalities
    return subsets


def evaluate_modality_subsets(
    model: UniMMAD,
    variables: dict,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    subsets: dict[str, frozenset[str]],
    progress: bool = True,
) -> dict:
    """`report.summarize_modality_subsets` of every evaluation dataset seen through each of `subsets`
    (`modality_subsets`): a class is scored on a subset when every sample of it has all the subset's modalities.
    """
    score_fn = make_score_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    results = {}
    for dataset in eval_datasets(config):
        available = class_modalities(config.data.data_dir, dataset, config.eval.split)
        wanted = config.data.classes.get(dataset)
        classes = [name for name in available if wanted is None or name in wanted]
        results[dataset] = {name: {} for name in classes}
        for subset, modalities in subsets.items():
            holding = [name for name in classes if modalities <= available[name]]
            if holding:
                scored = score_split(
                    score_fn, variables, config, dataset, config.eval.split, mesh, progress, holding, modalities
                )
                for name, values in per_class_metrics(scored).items():
                    results[dataset][name][subset] = values
    return report.summarize_modality_subsets(results, list(subsets))


def flat_scalars(summary: dict) -> dict[str, float]:
    """`{"<dataset or overall mean>/<metric>": value}`, for logs and for choosing the best checkpoint."""
    flat = {}
    for dataset, entry in summary["datasets"].items():
        flat.update({f"{dataset}/{k}": v for k, v in entry["mean"].items()})
    for overall in (report.ALL_CLASS_MEAN, report.ALL_DATASETS_MEAN):
        flat.update({f"{overall}/{k}": v for k, v in summary[overall].items()})
    return flat
