"""Batched evaluation: per-sample maps and scores, and the metrics per class and dataset (docs/model.md#metrics)."""

from __future__ import annotations

import functools
from collections import defaultdict

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


def predict_step(model: UniMMAD, variables: dict, images: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Eval-mode maps of a batch: `anomaly_map_raw`, `anomaly_map` (blurred) `[B, H, W]`, `image_score [B]`."""
    out = model.apply(variables, images, mask, train=False)
    raw = anomaly_map.raw_anomaly_map(out, images.shape[0], model.config.image_size)
    blurred = anomaly_map.blur(raw)
    return {"anomaly_map_raw": raw, "anomaly_map": blurred, "image_score": anomaly_map.image_score(blurred)}


def make_predict_fn(model: UniMMAD, mesh: Mesh):
    """`predict_step` compiled for the mesh: variables replicated, the batch split over devices."""
    split = sharding.batch_split(mesh)
    return jax.jit(
        functools.partial(sharding.traced_on(mesh, predict_step), model),
        in_shardings=(sharding.replicated(mesh), split, split),
        out_shardings=split,
    )


def evaluate_dataset(
    predict_fn, variables: dict, config: ml_collections.ConfigDict, dataset: str, mesh: Mesh, progress: bool = True
) -> dict[str, dict[str, float]]:
    """`{class: metrics}` of one prepared dataset's evaluation split, every host seeing all rows."""
    return per_class_metrics(predict_split(predict_fn, variables, config, dataset, config.eval.split, mesh, progress))


def predict_split(
    predict_fn,
    variables: dict,
    config: ml_collections.ConfigDict,
    dataset: str,
    split: str,
    mesh: Mesh,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every sample's `anomaly_map`, `image_score`, `gt_mask`, `label` and `class_name` of one split, on every
    process: each process reads and runs its share of every batch.

    Batches carry only as many modality slots as the dataset's samples have: the model never runs
    on slots that are padding for every sample (a single-modality dataset runs one slot).
    """
    batch_size = sharding.per_host_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    data_config = config.data.copy_and_resolve_references()
    data_config.num_slots = max_modality_count(config.data.data_dir, dataset, split)
    loader = eval_loader(data_config, dataset, split, batch_size=batch_size, shard_by_host=True)
    collected = defaultdict(list)
    progress = progress and sharding.is_main_process()
    for batch in tqdm(loader, total=loader.num_batches, desc=f"eval {dataset}", disable=not progress, leave=False):
        inputs = sharding.to_global(batch, mesh, ("specific_images", "modality_mask"))
        out = predict_fn(variables, inputs["specific_images"], inputs["modality_mask"])
        rows = sharding.gather(
            {
                "anomaly_map": out["anomaly_map"],
                "image_score": out["image_score"],
                "gt_mask": batch["gt_mask"].astype(np.uint8),
                "label": batch["label"],
                "valid": batch["valid"],
            }
        )
        rows["class_name"] = sharding.gather_text(batch["class_name"])
        valid = rows.pop("valid").astype(bool)
        for key, value in rows.items():
            collected[key].append(value[valid])
    columns = {key: np.concatenate(values) for key, values in collected.items()}
    return columns


def per_class_metrics(columns: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`{class: metrics}` of `predict_split`'s columns, classes in dataset order."""
    names = columns["class_name"]
    results = {}
    for name in dict.fromkeys(names):  # classes in dataset order
        rows = names == name
        results[name] = metrics.compute_metrics(
            columns["label"][rows], columns["image_score"][rows], columns["gt_mask"][rows], columns["anomaly_map"][rows]
        )
    return results


def evaluate(
    model: UniMMAD, variables: dict, config: ml_collections.ConfigDict, mesh: Mesh, progress: bool = True
) -> dict:
    """The metrics summary (`report.summarize_metrics`) over every evaluation dataset."""
    predict_fn = make_predict_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    results = {
        dataset: evaluate_dataset(predict_fn, variables, config, dataset, mesh, progress)
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
