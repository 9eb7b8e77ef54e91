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

from unimmad_jax import anomaly_map, metrics, report, sharding
from unimmad_jax.config import eval_datasets
from unimmad_jax.data import eval_loader
from unimmad_jax.data.prepared import max_modality_count
from unimmad_jax.models.unimmad import UniMMAD

REGION_KEYS = ("region_ids", "region_counts")


def score_step(model: UniMMAD, variables: dict, images: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Eval-mode maps of a batch: `anomaly_map_raw`, `anomaly_map` (blurred) `[B, H, W]`, `image_score [B]`."""
    out = model.apply(variables, images, mask, train=False)
    raw = anomaly_map.raw_anomaly_map(out, images.shape[0], model.config.image_size)
    blurred = anomaly_map.blur(raw)
    return {"anomaly_map_raw": raw, "anomaly_map": blurred, "image_score": anomaly_map.image_score(blurred)}


def make_score_fn(model: UniMMAD, mesh: Mesh):
    """`score_step` compiled for the mesh: variables replicated, the batch split over devices."""
    split = sharding.batch_split(mesh)
    return jax.jit(
        functools.partial(sharding.traced_on(mesh, score_step), model),
        in_shardings=(sharding.replicated(mesh), split, split),
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
) -> ScoredSplit:
    """Every sample's image score, label and class name of one split on every process, the maps left on the
    devices: each process reads and runs its share of every batch.

    Batches carry only as many modality slots as the dataset's samples have: the model never runs
    on slots that are padding for every sample (a single-modality dataset runs one slot).
    """
    batch_size = sharding.per_host_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    data_config = config.data.copy_and_resolve_references()
    data_config.num_slots = max_modality_count(config.data.data_dir, dataset, split)
    loader = eval_loader(data_config, dataset, split, batch_size=batch_size, shard_by_host=True)
    scored = ScoredSplit(mesh)
    progress = progress and sharding.is_main_process()
    for batch in tqdm(loader, total=loader.num_batches, desc=f"eval {dataset}", disable=not progress, leave=False):
        inputs = sharding.to_global(batch, mesh, ("specific_images", "modality_mask"))
        scored.add(score_fn(variables, inputs["specific_images"], inputs["modality_mask"]), batch)
    return scored


def per_class_metrics(scored: ScoredSplit) -> dict[str, dict[str, float]]:
    """`{class: metrics}` of `score_split`'s split, classes in dataset order.

    The pixel metrics of a class are computed over the batches holding its rows: by the host from the
    maps when one process holds all of them on a CPU (numpy's sorts are the fastest there), otherwise on
    the devices, only scalars coming back.
    """
    columns = scored.columns
    on_host = _metrics_on_host(scored.mesh)
    results = {}
    for name in dict.fromkeys(columns["class_name"]):  # classes in dataset order
        labels, scores = (columns[key][columns["class_name"] == name] for key in ("label", "image_score"))
        rows = [valid & (names == name) for names, valid in zip(scored.batch_class_names, scored.batch_valid)]
        held = [index for index, batch_rows in enumerate(rows) if batch_rows.any()]
        batches = [scored.batches[index] for index in held]
        if on_host:
            maps = np.concatenate([np.asarray(batch["anomaly_map"])[rows[i]] for i, batch in zip(held, batches)])
            masks = np.concatenate([np.asarray(batch["region_ids"])[rows[i]] > 0 for i, batch in zip(held, batches)])
            results[name] = metrics.compute_metrics(labels, scores, masks, maps)
            continue
        row_split = sharding.batch_split(scored.mesh)
        on_devices = [
            jax.make_array_from_callback(rows[i].shape, row_split, lambda index, batch_rows=rows[i]: batch_rows[index])
            for i in held
        ]
        results[name] = metrics.metrics_on_devices(
            labels.astype(bool),
            scores,
            [batch["anomaly_map"] for batch in batches],
            [batch["region_ids"] for batch in batches],
            [batch["region_counts"] for batch in batches],
            on_devices,
        )
    return results


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
    """The metrics summary (`report.summarize_metrics`) over every evaluation dataset; `score_fn`: `make_score_fn`'s,
    or a wrapper of it (training's, that a preemption notice stops)."""
    score_fn = score_fn or make_score_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    results = {
        dataset: evaluate_dataset(score_fn, variables, config, dataset, mesh, progress)
        for dataset in eval_datasets(config)
    }
    return report.summarize_metrics(results)


def flat_scalars(summary: dict) -> dict[str, float]:
    """`{"<dataset or overall mean>/<metric>": value}`, for logs and for choosing the best checkpoint."""
    flat = {}
    for dataset, entry in summary["datasets"].items():
        flat.update({f"{dataset}/{k}": v for k, v in entry["mean"].items()})
    for overall in (report.ALL_CLASS_MEAN, report.ALL_DATASETS_MEAN):
        flat.update({f"{overall}/{k}": v for k, v in summary[overall].items()})
    return flat
