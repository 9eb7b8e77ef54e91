"""Anomaly-detection metrics of one class (docs/model.md#metrics); `unimmad_jax.report` tables many classes.

Per class, ``compute_metrics`` returns ``i_auroc``, ``i_ap``, ``i_f1max`` over the image scores,
``p_auroc``, ``p_f1max``, ``p_ap`` over every pixel, and ``aupro_0.3``. A metric whose labels
hold one class only is NaN, with an ``UndefinedMetricWarning`` naming the cause; ``report.summarize_metrics``
lets NaN propagate into every mean it enters, so no average is silently taken over fewer classes.

The curves' metrics are computed once from counts at each distinct threshold (``threshold_metrics``):
on the host from numpy's sorts (``compute_metrics``), or where the maps lie, each device counting its own
pixels (``metrics_on_devices``, for maps split over a mesh); the ground truth's regions are labelled on the host.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import ndimage

from unimmad_jax import sharding

METRIC_NAMES = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_f1max", "aupro_0.3", "p_ap")
AUPRO_FPR_LIMIT = 0.3
AUPRO_NUM_THRESHOLDS = 99
F1_EPSILON = 1e-8
IMAGE_METRICS_TEXT = "I-AUROC, I-AP and I-F1max"
PIXEL_METRICS_TEXT = "P-AUROC, P-F1max, AUPRO@30% and P-AP"
# Two pixels belong to one ground-truth region when they touch by a side or a corner.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


class UndefinedMetricWarning(UserWarning):
    """A metric is NaN because its labels hold a single class."""


# ----------------------------------------------------------------------------
# One class
# ----------------------------------------------------------------------------


def compute_metrics(image_labels, image_scores, masks, anomaly_maps) -> dict[str, float]:
    """All seven metrics of one class, as python floats keyed by ``METRIC_NAMES``, computed on the host.

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
    metrics = image_metrics(image_labels, image_scores)
    if _both_classes_present(int(np.count_nonzero(masks)), masks.size, "masks", PIXEL_METRICS_TEXT):
        positive_scores = np.sort(anomaly_maps[masks], axis=None)
        normal_scores = np.sort(anomaly_maps[~masks], axis=None)
        curve = threshold_metrics(*_tie_counts(positive_scores, normal_scores))
        metrics["p_auroc"], metrics["p_ap"], metrics["p_f1max"] = map(float, curve)
        metrics["aupro_0.3"] = _aupro_of_sorted(masks, anomaly_maps, normal_scores)
    return metrics


def image_metrics(image_labels: np.ndarray, image_scores: np.ndarray) -> dict[str, float]:
    """``METRIC_NAMES`` with I-AUROC, I-AP and I-F1max of binary ``image_labels`` filled in, the rest NaN."""
    metrics = dict.fromkeys(METRIC_NAMES, float("nan"))
    labels, scores = np.asarray(image_labels, dtype=bool), np.asarray(image_scores)
    if _both_classes_present(int(np.count_nonzero(labels)), labels.size, "image_labels", IMAGE_METRICS_TEXT):
        counts = _tie_counts(np.sort(scores[labels]), np.sort(scores[~labels]))
        metrics["i_auroc"], metrics["i_ap"], metrics["i_f1max"] = map(float, threshold_metrics(*counts))
    return metrics


def _tie_counts(positive_scores: np.ndarray, negative_scores: np.ndarray):
    """``threshold_metrics``' counts at each distinct score of the positives, from both classes' scores sorted.

    Thresholds that only negatives score change neither recall nor AUROC's rank sum, and lower the
    precision below that of the next positive score above them: they are left out.
    """
    num_positive, num_negative = positive_scores.size, negative_scores.size
    starts = np.flatnonzero(np.concatenate([[True], positive_scores[1:] != positive_scores[:-1]]))
    values = positive_scores[starts]
    negatives_below = np.searchsorted(negative_scores, values, side="left")
    negatives_at = np.searchsorted(negative_scores, values, side="right") - negatives_below
    positives_at = np.diff(np.append(starts, num_positive))
    return positives_at, negatives_at, num_positive - starts, num_negative - negatives_below, num_positive, num_negative


def threshold_metrics(positives_at, negatives_at, true_positives, false_positives, num_positive, num_negative):
    """AUROC, AP and F1max of a binary problem from counts at each distinct threshold ``score >= t``.

    Each entry is one threshold (a group of tied scores): ``positives_at``/``negatives_at`` score
    exactly ``t``, ``true_positives``/``false_positives`` at least ``t``; entries without positives
    add nothing. AUROC is the ROC curve's trapezoids (the rank sum with ties counted half), AP
    scikit-learn's ``sum (R_k - R_k-1) P_k``, F1max ``max 2 P R / (P + R + 1e-8)``. Written with
    array operators only, so numpy (float64) and jax (in a jitted form) arrays share it.
    """
    recall = true_positives / num_positive
    predicted = true_positives + false_positives
    precision = true_positives / (predicted + (predicted == 0))
    share = positives_at / num_positive
    auroc_terms = share * ((num_negative - false_positives) + negatives_at / 2) / num_negative
    f1 = 2 * precision * recall / (precision + recall + F1_EPSILON) * (positives_at > 0)
    return auroc_terms.sum(), (share * precision).sum(), f1.max()


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
    normal_scores = np.sort(anomaly_maps[~masks], axis=None)
    return _aupro_of_sorted(masks, anomaly_maps, normal_scores, fpr_limit, num_thresholds)


def _aupro_of_sorted(
    masks, anomaly_maps, normal_scores, fpr_limit=AUPRO_FPR_LIMIT, num_thresholds=AUPRO_NUM_THRESHOLDS
):
    region_ids, num_regions = label_regions(masks)
    positions, fprs = threshold_positions(normal_scores.size, num_thresholds)
    bins = np.searchsorted(normal_scores[positions], anomaly_maps[masks], side="left")
    counts = np.bincount(
        (region_ids[masks] - 1) * (num_thresholds + 1) + bins, minlength=num_regions * (num_thresholds + 1)
    )
    pros = per_region_overlap(counts.reshape(num_regions, num_thresholds + 1))
    return aupro_area(fprs, pros, fpr_limit)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids 1..R of the 8-connected regions of every image in one pass; 0 off the masks.

    The 3-D structuring element only links pixels within the same image, so the
    ids are unique across the images of the class.
    """
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = EIGHT_CONNECTIVITY
    return ndimage.label(masks, structure=within_image)


def threshold_positions(num_normal: int, num_thresholds: int = AUPRO_NUM_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Where the ``num_thresholds`` thresholds lie among the ascending normal scores, and their FPRs."""
    positions = np.linspace(0, num_normal - 1, num_thresholds).astype(np.int64)
    return positions, 1.0 - (positions + 1) / num_normal


def per_region_overlap(counts):
    """PRO at each threshold from ``counts [R, T + 1]``: region r's pixels with ``j`` thresholds strictly
    below their score; rows of no pixels (padding) are left out of the mean over regions."""
    overlaps, num_regions = region_overlap_sums(counts)
    return overlaps / num_regions


def region_overlap_sums(counts):
    """``per_region_overlap``'s sum over the regions of each threshold's overlap, and the regions summed.

    A pixel is above threshold ``j`` when its count is > ``j``, so a reversed cumulative sum gives
    every region's pixels above every threshold."""
    above = counts[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]
    sizes = counts.sum(axis=1, keepdims=True)
    return (above / (sizes + (sizes == 0))).sum(axis=0), (sizes > 0).sum()


def aupro_area(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """The PRO curve's normalised area on FPR [0, fpr_limit], the point (1, 1) added, as docs/model.md#metrics."""
    fprs = np.concatenate([[1.0], fprs])
    pros = np.concatenate([[1.0], np.asarray(pros, dtype=np.float64)])
    order = np.argsort(fprs, kind="stable")
    return _partial_area(fprs[order], pros[order], fpr_limit) / fpr_limit


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
    if not ((values == 0) | (values == 1)).all():
        found = np.unique(values[~np.isin(values, (0, 1))])[:5]
        raise ValueError(f"{name} must hold only 0 and 1; found other values such as {found}")
    return values.astype(bool)


def _finite(values: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite numbers (dtype {values.dtype}, NaN or inf found)")
    return values


def _both_classes_present(num_positive: int, size: int, name: str, metric_names: str) -> bool:
    """Whether ``name``'s ``size`` labels hold both 0 and 1 (``num_positive`` ones); warns and returns False
    otherwise."""
    if 0 < num_positive < size:
        return True
    only = "1 (anomalous)" if num_positive else "0 (normal)"
    warnings.warn(
        f"{name} holds only {only}: {metric_names} are undefined and set to NaN",
        UndefinedMetricWarning,
        stacklevel=3,
    )
    return False


# ----------------------------------------------------------------------------
# One class whose maps lie on the devices
# ----------------------------------------------------------------------------


def region_ids_per_image(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..r_i of each image's 8-connected regions ``[N, h, w]`` (0 off the masks; int16 where they fit)
    and each r_i ``[N]``: computed where the masks are read, so that the maps' devices need only these."""
    masks = np.asarray(masks, dtype=bool)
    # An image of h x w pixels holds at most ceil(h / 2) * ceil(w / 2) regions: 16 bits up to 256 x 256.
    most_regions = -(-masks.shape[1] // 2) * -(-masks.shape[2] // 2)
    ids = np.zeros(masks.shape, dtype=np.int16 if most_regions < 2**15 else np.int32)
    counts = np.zeros(masks.shape[0], dtype=np.int32)
    for image, mask in enumerate(masks):
        if mask.any():
            counts[image] = ndimage.label(mask, structure=EIGHT_CONNECTIVITY, output=ids[image])
    return ids, counts


def metrics_on_devices(image_labels, image_scores, anomaly_maps, region_ids, region_counts, rows) -> dict[str, float]:
    """``compute_metrics`` of the rows ``rows`` of maps that lie on the devices; only scalars come back.

    Each device keeps its own pixels: only the class's anomalous pixel scores are gathered (few), the
    normal pixels are counted where they lie.

    Args:
      image_labels, image_scores: ``[n]`` of the class's images, on the host.
      anomaly_maps: ``[N, h, w]`` float32 jax arrays (or a list of them), their rows split over the data axis
        of one mesh (or on one device).
      region_ids, region_counts: ``region_ids_per_image`` of the masks, as jax arrays like ``anomaly_maps``.
      rows: ``[N]`` bool jax arrays like ``anomaly_maps``: the ``n`` rows of the class (others are other
        classes or padding).
    """
    metrics = image_metrics(image_labels, image_scores)
    pixels = tuple(
        list(x) if isinstance(x, list | tuple) else [x] for x in (anomaly_maps, region_ids, region_counts, rows)
    )
    mesh = _mesh_of(pixels[0][0])
    counts = map(int, device_pixel_counts(*pixels, mesh=mesh))
    num_anomalous, num_normal, _, most_anomalous, most_regions = counts
    if _both_classes_present(num_anomalous, num_anomalous + num_normal, "masks", PIXEL_METRICS_TEXT):
        positions, fprs = threshold_positions(num_normal)
        auroc, ap, f1, pros = device_pixel_metrics(
            *pixels,
            positions.astype(np.int32),
            mesh=mesh,
            anomalous_slots=_power_of_two(most_anomalous),  # a few compiled forms, not one a count
            region_slots=_power_of_two(most_regions),
        )
        metrics["p_auroc"], metrics["p_ap"], metrics["p_f1max"] = float(auroc), float(ap), float(f1)
        metrics["aupro_0.3"] = aupro_area(fprs, np.asarray(pros))
    return metrics


def _power_of_two(count: int) -> int:
    return 1 << max(count - 1, 0).bit_length()


def _mesh_of(array: jax.Array) -> Mesh:
    """The mesh ``array`` is split over; a one-device mesh for an array on one device."""
    if isinstance(array.sharding, NamedSharding):
        return array.sharding.mesh
    return Mesh(np.asarray(list(array.sharding.device_set)), (sharding.DATA_AXIS,))


def _local_pixels(anomaly_maps, region_ids, region_counts, rows):
    """This device's blocks concatenated: each pixel's order key, region id in its image (0 off the masks)
    and kind (1 anomalous, 2 normal, 0 outside the class), flat; and per row the index of its first region
    among this device's regions of the class, and the device's region count."""
    maps, ids, counts, rows = (
        jnp.concatenate(blocks, axis=0) for blocks in (anomaly_maps, region_ids, region_counts, rows)
    )
    in_class = jnp.broadcast_to(rows[:, None, None], maps.shape)
    kind = jnp.where(in_class, jnp.where(ids > 0, 1, 2), 0).astype(jnp.int8)
    class_counts = jnp.where(rows, counts, 0)
    first_region = jnp.cumsum(class_counts) - class_counts
    return _order_key(maps.astype(jnp.float32)).ravel(), ids.ravel(), kind.ravel(), first_region, class_counts.sum()


def _order_key(scores):
    """int32 keys ordered as the float32 ``scores`` (-0 as +0): the bit patterns, negatives' magnitudes reversed."""
    bits = jax.lax.bitcast_convert_type(jnp.where(scores == 0, 0.0, scores), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _on_data_axis(mesh: Mesh, function, num_outputs: int):
    """``function`` of the four pixel arrays' local blocks (and replicated extras) on each device of ``mesh``,
    its outputs reduced over the devices by ``function`` itself and so replicated."""
    split = PartitionSpec(sharding.DATA_AXIS)

    def run(*arrays):
        num_extra = len(arrays) - 4
        return jax.shard_map(
            function,
            mesh=mesh,
            in_specs=(split,) * 4 + (PartitionSpec(),) * num_extra,
            out_specs=(PartitionSpec(),) * num_outputs,
            check_vma=False,  # the outputs are sums over the devices or of gathered values: replicated
        )(*arrays)

    return run


@functools.partial(jax.jit, static_argnames="mesh")
def device_pixel_counts(anomaly_maps, region_ids, region_counts, rows, *, mesh: Mesh):
    """Anomalous and normal pixels and regions of the class, and the most anomalous pixels and the most regions
    of the class on one device; the arguments are lists as ``device_pixel_metrics``'."""

    def counts(*pixels):
        _, _, kind, _, num_regions = _local_pixels(*pixels)
        num_anomalous, num_normal = (kind == 1).sum(), (kind == 2).sum()
        total = jax.lax.psum((num_anomalous, num_normal, num_regions), sharding.DATA_AXIS)
        return *total, *jax.lax.pmax((num_anomalous, num_regions), sharding.DATA_AXIS)

    return _on_data_axis(mesh, counts, 5)(anomaly_maps, region_ids, region_counts, rows)


@functools.partial(jax.jit, static_argnames=("mesh", "anomalous_slots", "region_slots"))
def device_pixel_metrics(
    anomaly_maps, region_ids, region_counts, rows, positions, *, mesh: Mesh, anomalous_slots: int, region_slots: int
):
    """P-AUROC, P-AP, P-F1max and the PRO at each AUPRO threshold, each device holding its own pixels.

    The four pixel arguments are lists of ``metrics_on_devices``' arrays, their rows split over the data axis.
    ``anomalous_slots`` and ``region_slots`` are at least the class's anomalous pixels and regions on any
    one device. The anomalous scores of all devices are gathered and sorted; every device counts its
    normal pixels at and above each of them from one local sort, and the counts are summed over the
    devices. The AUPRO thresholds, the normal scores at global sorted ``positions``, are found by
    bisection over the scores' order keys, counting the normal pixels at or below each candidate the
    same way. A region lies in one image, so on one device: each device sums its regions' PROs.
    """

    def metrics(anomaly_maps, region_ids, region_counts, rows, positions):
        keys, ids, kind, first_region, _ = _local_pixels(anomaly_maps, region_ids, region_counts, rows)
        largest = jnp.iinfo(jnp.int32).max
        normal_keys = jnp.sort(jnp.where(kind == 2, keys, largest))
        anomalous = kind == 1
        (local_anomalous,) = jnp.nonzero(anomalous, size=anomalous_slots, fill_value=keys.size)
        local_keys = keys.at[local_anomalous].get(mode="fill", fill_value=largest)

        def total(values):
            return jax.lax.psum(values, sharding.DATA_AXIS)

        def normals_below(candidates, side):
            return total(jnp.searchsorted(normal_keys, candidates, side=side).astype(jnp.int32))

        # AUROC, AP, F1max: thresholds at the positives' distinct scores, as `_tie_counts`.
        positive_keys = jnp.sort(jax.lax.all_gather(local_keys, sharding.DATA_AXIS, tiled=True))
        num_positive, num_negative = total(anomalous.sum()), total((kind == 2).sum())
        index = jnp.arange(positive_keys.size)
        starts = (index < num_positive) & jnp.concatenate([jnp.ones(1, bool), positive_keys[1:] != positive_keys[:-1]])
        ends = (index < num_positive) & ((index == num_positive - 1) | jnp.append(starts[1:], True))
        start = jax.lax.cummax(jnp.where(starts, index, 0))
        negatives_below = normals_below(positive_keys, "left")
        negatives_at = normals_below(positive_keys, "right") - negatives_below
        auroc, ap, f1 = threshold_metrics(
            jnp.where(ends, index + 1 - start, 0),
            jnp.where(ends, negatives_at, 0),
            num_positive - start,
            num_negative - negatives_below,
            num_positive,
            num_negative,
        )

        # AUPRO: the k-th normal score is the smallest key with more than k normal keys at or below it.
        def bisect(_, bounds):
            low, high = bounds
            middle = (low & high) + ((low ^ high) >> 1)  # floor((low + high) / 2) without overflow
            enough = normals_below(middle, "right") > positions
            return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

        num_local = (kind == 2).sum()
        lowest = jax.lax.pmin(jnp.where(num_local > 0, normal_keys[0], largest), sharding.DATA_AXIS)
        highest = jax.lax.pmax(jnp.where(num_local > 0, normal_keys[num_local - 1], -largest), sharding.DATA_AXIS)
        bounds = (jnp.full(positions.shape, lowest), jnp.full(positions.shape, highest))
        thresholds, _ = jax.lax.fori_loop(0, 32, bisect, bounds)
        num_thresholds = positions.size
        bins = jnp.searchsorted(thresholds, local_keys, side="left")
        image = jnp.minimum(local_anomalous // (keys.size // first_region.size), first_region.size - 1)
        region = first_region[image] + ids.at[local_anomalous].get(mode="fill", fill_value=0) - 1
        slot = jnp.where(local_anomalous < keys.size, region, region_slots)
        counts = jax.ops.segment_sum(
            jnp.ones_like(bins),
            slot * (num_thresholds + 1) + bins,
            num_segments=(region_slots + 1) * (num_thresholds + 1),
        )
        overlaps, num_regions = region_overlap_sums(counts.reshape(region_slots + 1, num_thresholds + 1)[:region_slots])
        return auroc, ap, f1, total(overlaps) / total(num_regions)

    return _on_data_axis(mesh, metrics, 4)(anomaly_maps, region_ids, region_counts, rows, positions)
