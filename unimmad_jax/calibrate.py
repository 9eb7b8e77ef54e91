"""Calibration: from raw image scores to decisions, per class, and the statistics that normalise scores and maps.

For each class (its dataset's pooled images where the class has fewer than
`calibrate.min_class_images` calibration images, and for images of an unknown class):

- with anomalous calibration images, the threshold maximising F1 on them (midway between the
  lowest flagged score and the highest score below it, the same decisions with a margin);
- with good images only, the `calibrate.good_quantile` quantile of their scores, kept above
  their minimum so that the good calibration images are never all flagged;
- the normalised score is piecewise linear through (minimum, 0), (threshold, 0.5), (maximum, 1)
  of the calibration scores, clipped to [0, 1]: monotone, and `score >= threshold` (the decision)
  exactly when the normalised score is >= 0.5.  Maps are normalised by the same function of
  their class, never per image, so one colour scale means the same everywhere.

The calibration split is each dataset's `calibrate.split` (validation).  A dataset without one,
like the built-in synthetic data, is calibrated on the good images of its train split; the model
has trained on them, so their scores run lower than unseen good images' and more good test
images are flagged than `1 - good_quantile`.  `<workdir>/calibration.json` holds the result for
one checkpoint step, with the decisions' test-split accuracy, precision, recall and F1 per class
beside the threshold-free metrics.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from unimmad_jax import evaluate, report, sharding
from unimmad_jax.config import eval_datasets
from unimmad_jax.data import InvalidDataError
from unimmad_jax.data.prepared import dataset_folder, read_index
from unimmad_jax.models.unimmad import UniMMAD

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
_SPAN_FLOOR = 1e-12  # a zero-width span (threshold at the minimum or maximum) still divides
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
DECISION_METRICS = ("accuracy", "precision", "recall", "f1")


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What turns one class's image scores and maps into normalised values and decisions."""

    threshold: float
    minimum: float
    maximum: float

    @classmethod
    def from_json(cls, entry: dict) -> Statistics:
        return cls(float(entry["threshold"]), float(entry["minimum"]), float(entry["maximum"]))

    def with_threshold(self, threshold: float) -> Statistics:
        return dataclasses.replace(self, threshold=float(np.float32(threshold)))


def normalize(values, threshold, minimum, maximum) -> jax.Array:
    """Piecewise linear, 0.5 exactly at `threshold`, 0 / 1 at `minimum` / `maximum`, clipped.

    The statistics broadcast against `values` (per-sample statistics of maps: `[B, 1, 1]`).
    """
    values = jnp.asarray(values, jnp.float32)
    threshold, minimum, maximum = (jnp.asarray(v, jnp.float32) for v in (threshold, minimum, maximum))
    above = 0.5 + 0.5 * (values - threshold) / jnp.maximum(maximum - threshold, _SPAN_FLOOR)
    below = jnp.minimum(0.5 * (values - minimum) / jnp.maximum(threshold - minimum, _SPAN_FLOOR), _BELOW_HALF)
    return jnp.clip(jnp.where(values >= threshold, above, below), 0.0, 1.0)


def threshold_at(level: float, statistics: Statistics) -> float:
    """The image score whose normalised value is `level` (the inverse of `normalize` on [0, 1])."""
    s = statistics
    if level >= 0.5:
        return s.threshold + (level - 0.5) * 2.0 * (s.maximum - s.threshold)
    return s.minimum + level * 2.0 * (s.threshold - s.minimum)


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> np.float32:
    """The threshold (flag `score >= threshold`) of the highest F1 on labelled scores."""
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable")
    ranked, flagged_anomalous = scores[order], np.asarray(labels)[order] == 1
    true_positives = np.cumsum(flagged_anomalous)
    false_positives = np.cumsum(~flagged_anomalous)
    last_of_value = np.append(ranked[1:] != ranked[:-1], True)  # flag every image of a tied score or none
    f1 = 2 * true_positives / (true_positives + false_positives + flagged_anomalous.sum())
    best = int(np.flatnonzero(last_of_value)[np.argmax(f1[last_of_value])])
    if best + 1 == len(ranked):
        return ranked[best]
    midway = np.float32((ranked[best] + ranked[best + 1]) / 2)
    return midway if midway > ranked[best + 1] else ranked[best]  # adjacent floats have no midway


def good_quantile_threshold(good_scores: np.ndarray, quantile: float) -> np.float32:
    """The `quantile` of good scores, above their minimum: at least one good image stays unflagged."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"calibrate.good_quantile={quantile} must lie in (0, 1)")
    good_scores = np.asarray(good_scores, np.float32)
    lowest = good_scores.min()
    return max(np.float32(np.quantile(good_scores, quantile)), np.nextafter(lowest, np.float32(np.inf)))


def statistics_entry(labels: np.ndarray, scores: np.ndarray, good_quantile: float) -> dict:
    """The JSON entry of one class or dataset: threshold, minimum, maximum, method and image counts."""
    scores = np.asarray(scores, np.float32)
    good, anomalous = int(np.sum(labels == 0)), int(np.sum(labels == 1))
    if good == 0:
        raise InvalidDataError("calibration needs good images and this calibration split has none")
    if anomalous:
        threshold, method = f1_threshold(labels, scores), "f1"
    else:
        threshold, method = good_quantile_threshold(scores[labels == 0], good_quantile), f"good_q{good_quantile:g}"
    return {
        "threshold": float(threshold),
        "minimum": float(scores.min()),
        "maximum": float(scores.max()),
        "method": method,
        "good": good,
        "anomalous": anomalous,
    }


def decision_metrics(labels: np.ndarray, decisions: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 0/1 decisions (precision 0 when nothing is flagged)."""
    labels, decisions = np.asarray(labels) == 1, np.asarray(decisions).astype(bool)
    true_positives = float(np.sum(labels & decisions))
    precision = true_positives / max(float(decisions.sum()), 1.0)
    recall = true_positives / max(float(labels.sum()), 1.0)
    return {
        "accuracy": float(np.mean(labels == decisions)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def calibration_split(config: ml_collections.ConfigDict, dataset: str) -> str:
    """`calibrate.split` where the dataset has it, else its train split (good images only)."""
    splits = read_index(dataset_folder(config.data.data_dir, dataset)).splits
    return config.calibrate.split if config.calibrate.split in splits else "train"


def calibrate_dataset(columns: dict[str, np.ndarray], split: str, modality_types: dict, config) -> dict:
    """The dataset-level and per-class entries of one dataset from its calibration split's predictions."""
    labels, scores, names = columns["label"], columns["image_score"], columns["class_name"]
    quantile = config.calibrate.good_quantile
    pooled = statistics_entry(labels, scores, quantile)
    classes = {}
    for name in dict.fromkeys(names):
        rows = names == name
        if rows.sum() >= config.calibrate.min_class_images and np.any(labels[rows] == 0):
            entry = {**statistics_entry(labels[rows], scores[rows], quantile), "source": "class"}
        else:
            entry = {**pooled, "source": "dataset"}
        classes[str(name)] = {**entry, "modality_types": modality_types[name]}
    return {"split": split, "dataset": pooled, "classes": classes}


def class_modality_types(config: ml_collections.ConfigDict, dataset: str, split: str) -> dict[str, list[str]]:
    """Each class's modality types (of its first sample) in `split`."""
    index = read_index(dataset_folder(config.data.data_dir, dataset)).splits[split]
    types = {}
    for name, sample_types in zip(index.class_names, index.modality_types):
        types.setdefault(name, list(sample_types))
    return types


def statistics_for(record: dict, dataset: str, class_name: str) -> tuple[Statistics, str]:
    """The statistics of a sample of `class_name` (empty: unknown) in `dataset`, and where they come from."""
    entry = record["datasets"].get(dataset)
    if entry is None:
        raise InvalidDataError(
            f"{CALIBRATION_FILE} has no dataset {dataset!r} (it has {sorted(record['datasets'])}): "
            "run --mode=calibrate with this dataset among config.eval.datasets"
        )
    if class_name in entry["classes"]:
        return Statistics.from_json(entry["classes"][class_name]), f"the calibration of class {class_name}"
    return Statistics.from_json(entry["dataset"]), f"the dataset-level calibration of {dataset} (class not calibrated)"


def override(statistics: Statistics, threshold: float | None, sensitivity: float | None) -> Statistics:
    """`config.predict.threshold` (an image score for every class) or `.sensitivity` in (0, 1) applied.

    The normalisation keeps 0.5 at the threshold in use, so the decision and the maps' 0.5 contour agree."""
    if threshold is not None and sensitivity is not None:
        raise ValueError("set at most one of config.predict.threshold and config.predict.sensitivity")
    if threshold is not None:
        return statistics.with_threshold(threshold)
    if sensitivity is not None:
        if not 0.0 < sensitivity < 1.0:
            raise ValueError(f"config.predict.sensitivity={sensitivity} must lie in (0, 1); 0.5 is the calibration")
        return statistics.with_threshold(threshold_at(1.0 - sensitivity, statistics))
    return statistics


def calibrate(model: UniMMAD, variables: dict, config: ml_collections.ConfigDict, mesh: Mesh, step: int | None) -> dict:
    """The calibration record of `variables` (checkpoint step `step`) over every evaluation dataset."""
    score_fn = evaluate.make_score_fn(model, mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    record = {
        "format_version": FORMAT_VERSION,
        "checkpoint_step": step,
        "good_quantile": config.calibrate.good_quantile,
        "datasets": {},
        "test": {"split": config.eval.split, "datasets": {}},
    }
    for dataset in eval_datasets(config):
        split = calibration_split(config, dataset)
        columns = evaluate.score_split(score_fn, variables, config, dataset, split, mesh).columns
        types = class_modality_types(config, dataset, split)
        record["datasets"][dataset] = calibrate_dataset(columns, split, types, config)
        scored_test = evaluate.score_split(score_fn, variables, config, dataset, config.eval.split, mesh)
        threshold_free, test = evaluate.per_class_metrics(scored_test), scored_test.columns
        report = {}
        for name, metrics in threshold_free.items():
            rows = test["class_name"] == name
            threshold = statistics_for(record, dataset, name)[0].threshold
            decisions = test["image_score"][rows] >= np.float32(threshold)
            report[name] = {**decision_metrics(test["label"][rows], decisions), **metrics}
        record["test"]["datasets"][dataset] = report
    return record


def calibrate_workdir(
    model: UniMMAD, variables: dict, config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh: Mesh, step
) -> dict:
    """Calibrate, print the table and write `<workdir>/calibration.json` (process 0)."""
    record = calibrate(model, variables, config, mesh, step)
    if jax.process_index() == 0:
        path = epath.Path(workdir) / CALIBRATION_FILE
        path.write_text(json.dumps(record, indent=1))
        table = report.calibration_markdown(record, (*DECISION_METRICS, "i_auroc", "i_f1max"))
        print(f"\nCalibration (checkpoint step {step}; test split {config.eval.split}):\n{table}wrote {path}")
    return record


def load(workdir: epath.PathLike, step: int | None) -> dict:
    """`<workdir>/calibration.json`, checked to be of this format and of checkpoint step `step`."""
    path = epath.Path(workdir) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run `python -m unimmad_jax.main --mode=calibrate` on this workdir first")
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise InvalidDataError(
            f"{path} has format_version {record.get('format_version')}, this version reads {FORMAT_VERSION}: "
            "run --mode=calibrate again"
        )
    if record["checkpoint_step"] != step:
        raise InvalidDataError(
            f"{path} calibrates checkpoint step {record['checkpoint_step']} but the checkpoint in use is step "
            f"{step}, which has no calibration: run --mode=calibrate again"
        )
    return record
