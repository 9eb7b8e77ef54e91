"""A frozen copy of `unimmad_jax.metrics`' one-class metrics as they were computed with scikit-learn's curves:
the oracle the package's fast metrics are tested against (tests/test_metrics.py) and timed against
(experiments/bench/eval_metrics.py)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from unimmad_jax.metrics import METRIC_NAMES, UndefinedMetricWarning

AUPRO_FPR_LIMIT = 0.3
AUPRO_NUM_THRESHOLDS = 99
F1_EPSILON = 1e-8
# Two pixels belong to one ground-truth region when they touch by a side or a corner.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def compute_metrics(image_labels, image_scores, masks, anomaly_maps) -> dict[str, float]:
    """All seven metrics of one class, as python floats keyed by ``METRIC_NAMES``.

    Args:
      image_labels: ``[N]``, 1 for an anomalous image, 0 for a normal one.
      image_scores: ``[N]``, higher means more anomalous.
      masks: ``[N, h, w]`` ground truth, 1 on anomalous pixels, 0 elsewhere.
      anomaly_maps: ``[N, h, w]``, higher means more anomalous.

    Raises:
      ValueError: on shapes that do not fit together, labels or masks that are
        not binary, or scores and maps that are not finite.
    """
    image_labels, image_scores, masks, anomaly_maps = _validated(image_labels, image_scores, masks, anomaly_maps)
    metrics = dict.fromkeys(METRIC_NAMES, float("nan"))
    if _both_classes_present(image_labels, "image_labels", "I-AUROC, I-AP and I-F1max"):
        metrics["i_auroc"] = float(roc_auc_score(image_labels, image_scores))
        image_ap_f1 = average_precision_and_f1_max(image_labels, image_scores)
        metrics["i_ap"], metrics["i_f1max"] = image_ap_f1
    if _both_classes_present(masks, "masks", "P-AUROC, P-F1max, AUPRO@30% and P-AP"):
        pixel_labels, pixel_scores = masks.ravel(), anomaly_maps.ravel()
        metrics["p_auroc"] = float(roc_auc_score(pixel_labels, pixel_scores))
        pixel_ap_f1 = average_precision_and_f1_max(pixel_labels, pixel_scores)
        metrics["p_ap"], metrics["p_f1max"] = pixel_ap_f1
        metrics["aupro_0.3"] = aupro(masks, anomaly_maps)
    return metrics


def average_precision_and_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AP and F1max of binary ``labels`` (both classes present) from one PR curve.

    AP = ``-sum(diff(R) * P[:-1])``, F1max = ``max 2 P R / (P + R + 1e-8)``, over
    the points of scikit-learn's ``precision_recall_curve``.
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    average_precision = -np.sum(np.diff(recall) * precision[:-1])
    f1 = 2 * precision * recall / (precision + recall + F1_EPSILON)
    return float(average_precision), float(np.max(f1))


def aupro(
    masks: np.ndarray,
    anomaly_maps: np.ndarray,
    fpr_limit: float = AUPRO_FPR_LIMIT,
    num_thresholds: int = AUPRO_NUM_THRESHOLDS,
) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit], as docs/model.md#metrics reads it.

    ``masks`` boolean ``[N, h, w]`` with both anomalous and normal pixels; regions are the
    8-connected components of all images, thresholds the normal pixels' scores at truncated
    ``linspace`` positions, and a region pixel counts above a threshold when strictly greater.
    """
    masks = np.asarray(masks, dtype=bool)
    anomaly_maps = np.asarray(anomaly_maps)
    if masks.all() or not masks.any():
        raise ValueError("aupro needs masks holding both anomalous and normal pixels")
    region_ids, num_regions = _label_regions(masks)
    thresholds, fprs = _normal_pixel_thresholds(anomaly_maps[~masks], num_thresholds)
    pros = _per_region_overlap(region_ids[masks] - 1, anomaly_maps[masks], num_regions, thresholds)
    fprs = np.concatenate([[1.0], fprs])
    pros = np.concatenate([[1.0], pros])
    order = np.argsort(fprs, kind="stable")
    return _partial_area(fprs[order], pros[order], fpr_limit) / fpr_limit


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids 1..R of the 8-connected regions of every image in one pass; 0 off the masks.

    The 3-D structuring element only links pixels within the same image, so the
    ids are unique across the images of the class.
    """
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = EIGHT_CONNECTIVITY
    return ndimage.label(masks, structure=within_image)


def _normal_pixel_thresholds(normal_scores: np.ndarray, num_thresholds: int):
    """The ``num_thresholds`` thresholds (ascending) and their FPRs (docs/model.md#metrics)."""
    sorted_scores = np.sort(normal_scores, axis=None)
    num_normal = sorted_scores.size
    positions = np.linspace(0, num_normal - 1, num_thresholds).astype(np.int64)
    return sorted_scores[positions], 1.0 - (positions + 1) / num_normal


def _per_region_overlap(
    region_index: np.ndarray, scores: np.ndarray, num_regions: int, thresholds: np.ndarray
) -> np.ndarray:
    """PRO at each threshold: mean over regions of the fraction of pixels ``> t``.

    Each anomalous pixel is binned by how many thresholds lie strictly below its
    score (a binary search in the ascending thresholds); a pixel is above
    threshold ``j`` exactly when its bin is > ``j``, so a reversed cumulative sum of
    the per-region bin counts gives every region's count above every threshold.
    """
    num_thresholds = thresholds.size
    bins = np.searchsorted(thresholds, scores, side="left")
    counts = np.bincount(
        region_index * (num_thresholds + 1) + bins, minlength=num_regions * (num_thresholds + 1)
    ).reshape(num_regions, num_thresholds + 1)
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return np.mean(above / counts.sum(axis=1, keepdims=True), axis=0)


def _partial_area(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under ``y(x)`` on [x[0], x_limit]; ``x`` ascending, reaching below the limit."""
    below = x < x_limit
    x_closed = np.concatenate([x[below], [x_limit]])
    y_closed = np.concatenate([y[below], [np.interp(x_limit, x, y)]])
    return float(np.trapezoid(y_closed, x_closed))


def _validated(image_labels, image_scores, masks, anomaly_maps):
    """The inputs as arrays (labels and masks boolean), after checking they fit together."""
    image_labels = np.asarray(image_labels)
    image_scores = np.asarray(image_scores)
    masks = np.asarray(masks)
    anomaly_maps = np.asarray(anomaly_maps)
    if image_labels.ndim != 1 or image_scores.shape != image_labels.shape:
        raise ValueError(
            "image_labels and image_scores must both have shape [N]; got "
            f"image_labels {image_labels.shape} and image_scores {image_scores.shape}"
        )
    if masks.ndim != 3 or anomaly_maps.shape != masks.shape:
        raise ValueError(
            "masks and anomaly_maps must both have shape [N, h, w]; got "
            f"masks {masks.shape} and anomaly_maps {anomaly_maps.shape}"
        )
    if masks.shape[0] != image_labels.shape[0]:
        raise ValueError(
            f"image_labels has {image_labels.shape[0]} images but masks has {masks.shape[0]} "
            f"(image_labels {image_labels.shape}, masks {masks.shape})"
        )
    return (
        _binary(image_labels, "image_labels"),
        _finite(image_scores, "image_scores"),
        _binary(masks, "masks"),
        _finite(anomaly_maps, "anomaly_maps"),
    )


def _binary(values: np.ndarray, name: str) -> np.ndarray:
    if not np.isin(values, (0, 1)).all():
        found = np.unique(values[~np.isin(values, (0, 1))])[:5]
        raise ValueError(f"{name} must hold only 0 and 1; found other values such as {found}")
    return values.astype(bool)


def _finite(values: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite numbers (dtype {values.dtype}, NaN or inf found)")
    return values


def _both_classes_present(labels: np.ndarray, name: str, metric_names: str) -> bool:
    """Whether ``labels`` holds both 0 and 1; warns and returns False otherwise."""
    num_positive = int(np.count_nonzero(labels))
    if 0 < num_positive < labels.size:
        return True
    only = "1 (anomalous)" if num_positive else "0 (normal)"
    warnings.warn(
        f"{name} holds only {only}: {metric_names} are undefined and set to NaN",
        UndefinedMetricWarning,
        stacklevel=3,
    )
    return False
