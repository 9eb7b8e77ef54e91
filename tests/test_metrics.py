"""Tests of unimmad_jax.metrics against the reference fixture, a slow reference, and properties."""

import re
from collections import deque

import jax
import metrics_oracle
import numpy as np
import pytest
from helpers import PARITY
from jax.sharding import Mesh
from scipy import ndimage
from sklearn.metrics import average_precision_score

from unimmad_jax import sharding
from unimmad_jax.metrics import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    aupro,
    compute_metrics,
    device_pixel_metrics,
    metrics_on_devices,
    region_ids_per_image,
)

FIXTURE = PARITY / "cases" / "metrics_official.npz"
# docs/parity.md#tolerances: metrics 1e-6 absolute, AUPRO 1e-4.
TOLERANCE = {name: 1e-4 if name == "aupro_0.3" else 1e-6 for name in METRIC_NAMES}


# ----------------------------------------------------------------------------
# The reference's own values
# ----------------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"fixture {FIXTURE} not present")
def test_matches_reference_fixture():
    case = np.load(FIXTURE)
    metrics = compute_metrics(case["image_labels"], case["image_scores"], case["masks"], case["anomaly_maps"])
    assert set(metrics) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert isinstance(metrics[name], float)
        assert abs(metrics[name] - float(case[name])) <= TOLERANCE[name], name
    # The reading of AUPRO in docs/model.md#metrics reproduces the reference exactly.
    assert abs(metrics["aupro_0.3"] - float(case["aupro_0.3"])) < 1e-12


# ----------------------------------------------------------------------------
# An unseen case against a slow, loop-based reference
# ----------------------------------------------------------------------------


def _structured_case(seed=0, num_images=30, size=48):
    """Blob and diagonal-chain defects, noisy maps correlated with them, quantized so scores tie."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((num_images, size, size), dtype=np.uint8)
    signal = np.zeros((num_images, size, size))
    labels = (rng.random(num_images) < 0.6).astype(np.int64)
    labels[:2] = (0, 1)
    for image in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            defect = np.zeros((size, size), dtype=bool)
            if rng.random() < 0.7:
                cy, cx = rng.integers(6, size - 6, 2)
                ry, rx = rng.uniform(1.5, 6, 2)
                defect[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1] = True
            else:  # pixels touching only by their corners: one region under 8-connectivity
                start = rng.integers(2, size - 12, 2)
                steps = np.arange(rng.integers(3, 10))
                defect[start[0] + steps, start[1] + steps] = True
            masks[image][defect] = 1
            signal[image][defect] = rng.uniform(0.2, 1.0)
    maps = ndimage.gaussian_filter(signal, (0, 1.5, 1.5)) + 0.35 * rng.random(masks.shape)
    maps = np.round(maps * 32) / 32
    scores = maps.reshape(num_images, -1).max(axis=1) + 0.3 * rng.random(num_images)
    scores = np.round(scores * 16) / 16
    return labels, scores, masks, maps


def _reference_roc_auc(labels, scores):
    """Trapezoids over (FPR, TPR) at every distinct threshold ``score >= t``, counted directly."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    area, previous_fpr, previous_tpr = 0.0, 0.0, 0.0
    for threshold in np.unique(scores)[::-1]:
        tpr = np.count_nonzero(positives >= threshold) / positives.size
        fpr = np.count_nonzero(negatives >= threshold) / negatives.size
        area += (fpr - previous_fpr) * (tpr + previous_tpr) / 2
        previous_fpr, previous_tpr = fpr, tpr
    return area


def _reference_ap_and_f1_max(labels, scores):
    """AP = sum (R_k - R_{k-1}) P_k and max F1 over every distinct threshold ``score >= t``."""
    num_positive = np.count_nonzero(labels)
    average_precision, previous_recall, best_f1 = 0.0, 0.0, 0.0
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        true_positives = np.count_nonzero(predicted & (labels == 1))
        precision = true_positives / np.count_nonzero(predicted)
        recall = true_positives / num_positive
        average_precision += (recall - previous_recall) * precision
        best_f1 = max(best_f1, 2 * precision * recall / (precision + recall + 1e-8))
        previous_recall = recall
    return average_precision, best_f1


def _reference_regions(mask):
    """Pixel lists of the 8-connected regions of one binary image, by flood fill."""
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, frontier = [], deque([start])
        while frontier:
            y, x = frontier.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        frontier.append((ny, nx))
        regions.append(region)
    return regions


def _reference_aupro(masks, maps, fpr_limit=0.3):
    """AUPRO as docs/model.md#metrics reads it, with explicit loops over thresholds, regions and curve segments."""
    region_scores = [
        np.array([maps[image][pixel] for pixel in region])
        for image in range(masks.shape[0])
        for region in _reference_regions(masks[image])
    ]
    normal_scores = sorted(maps[masks == 0].tolist())
    num_normal = len(normal_scores)
    curve = [(1.0, 1.0)]
    for position in np.linspace(0, num_normal - 1, 99):
        position = int(position)
        threshold = normal_scores[position]
        pro = sum(np.mean(scores > threshold) for scores in region_scores) / len(region_scores)
        curve.append((1 - (position + 1) / num_normal, pro))
    curve.sort(key=lambda point: point[0])
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # close the area at the limit, on the segment's straight line
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_matches_slow_reference_on_unseen_case():
    labels, scores, masks, maps = _structured_case()
    pixel_labels, pixel_scores = masks.ravel(), maps.ravel()
    image_ap, image_f1 = _reference_ap_and_f1_max(labels, scores)
    pixel_ap, pixel_f1 = _reference_ap_and_f1_max(pixel_labels, pixel_scores)
    expected = {
        "i_auroc": _reference_roc_auc(labels, scores),
        "i_ap": image_ap,
        "i_f1max": image_f1,
        "p_auroc": _reference_roc_auc(pixel_labels, pixel_scores),
        "p_f1max": pixel_f1,
        "aupro_0.3": _reference_aupro(masks, maps),
        "p_ap": pixel_ap,
    }
    metrics = compute_metrics(labels, scores, masks, maps)
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-12), name
    # Ties between region pixels and thresholds exist, so `>` vs `>=` is exercised here.
    assert 0.05 < expected["aupro_0.3"] < 0.95
    # AP read off the shared PR curve is scikit-learn's average_precision_score.
    assert metrics["p_ap"] == average_precision_score(pixel_labels, pixel_scores)
    assert metrics["i_ap"] == average_precision_score(labels, scores)


# ----------------------------------------------------------------------------
# The MVTec 3D-AD evaluation's AU-PRO
# ----------------------------------------------------------------------------


def _mvtec_au_pro(masks, maps, integration_limit=0.3, num_thresholds=100):
    """AU-PRO as the MVTec 3D-AD evaluation code (`au_pro_util.py`) computes it, written out independently.

    Its thresholds are the normal pixels' scores at `num_thresholds` positions `linspace(0, M - 1)` cast to
    integers, each with FPR `1 - (position + 1) / M`; a region's overlap is the share of its pixels scoring above
    the threshold; the curve, with (1, 1) appended, runs in ascending FPR; the trapezoids end at the integration
    limit, the last one's height interpolated there, and the area is divided by the limit.
    """
    regions, normal_scores = [], []
    for mask, scores in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), int))
        regions += [np.sort(scores[labelled == region]) for region in range(1, count + 1)]
        normal_scores += scores[labelled == 0].tolist()
    normal_scores = np.sort(normal_scores)
    fprs, pros = [1.0], [1.0]
    for position in np.linspace(0, normal_scores.size - 1, num=num_thresholds, dtype=int):
        threshold = normal_scores[position]
        fprs.append(1.0 - (position + 1) / normal_scores.size)
        # Pixels at or below the threshold are the region's missed ones.
        pros.append(np.mean([1.0 - np.searchsorted(r, threshold, side="right") / r.size for r in regions]))
    fprs, pros = fprs[::-1], pros[::-1]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x1 <= integration_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < integration_limit:  # the segment crossing the limit, cut there
            y_limit = y0 + (y1 - y0) * (integration_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (integration_limit - x0)
    return area / integration_limit


def _smooth_case(seed, num_images=12, size=64):
    """Several elliptic defects an image, smooth maps over them: no ties among scores."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((num_images, size, size), dtype=bool)
    signal = np.zeros((num_images, size, size))
    for image in range(num_images):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(6, size - 6, 2)
            ry, rx = rng.uniform(2, 7, 2)
            defect = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
            masks[image] |= defect
            signal[image][defect] += rng.uniform(0.3, 1.5)
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 3, 3))
    return masks, ndimage.gaussian_filter(signal, (0, 2, 2)) + 4 * noise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_agrees_with_the_mvtec_3d_ad_evaluation(seed):
    """The reference's 99 thresholds sample the same curve as MVTec's 100: on smooth maps the areas agree within
    1e-3; with 100 thresholds the reading is MVTec's (docs/model.md#metrics)."""
    masks, maps = _smooth_case(seed)
    ours, mvtec = aupro(masks, maps), _mvtec_au_pro(masks, maps)
    assert 0.2 < mvtec < 0.9  # a curve away from both ends, where the sampling of thresholds shows
    assert abs(ours - mvtec) < 1e-3
    assert aupro(masks, maps, num_thresholds=100) == pytest.approx(mvtec, abs=1e-12)


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


def test_perfect_scores_give_one_everywhere():
    labels, _, masks, _ = _structured_case(seed=1)
    metrics = compute_metrics(labels, labels.astype(float), masks, masks.astype(float))
    for name in METRIC_NAMES:
        # F1max is 2 / (2 + 1e-8) at best, by its epsilon.
        assert metrics[name] == pytest.approx(1.0, abs=1e-8), name


def test_inverted_scores_give_auroc_zero():
    labels, scores, masks, maps = _structured_case(seed=2)
    perfect_inverse_scores = -labels + 0.1 * np.random.default_rng(0).random(labels.size)
    metrics = compute_metrics(labels, perfect_inverse_scores, masks, -masks.astype(float))
    assert metrics["i_auroc"] == 0.0
    assert metrics["p_auroc"] == 0.0
    assert metrics["aupro_0.3"] == 0.0


def _image_with_blocks(blocks, size=12):
    """Mask and map of one image: normal pixels score in [0, 1), each (corner, side, score)
    block is a defect."""
    mask = np.zeros((size, size), dtype=bool)
    scores = np.random.default_rng(0).random((size, size))
    for (row, col), side, score in blocks:
        mask[row : row + side, col : col + side] = True
        scores[row : row + side, col : col + side] = score
    return mask, scores


# A 2x2 block scoring above every normal pixel (detected) and a 4x4 one below all of them (missed).
DETECTED_2X2, MISSED_4X4 = 2.0, -1.0


def test_aupro_uses_eight_connectivity():
    # The 2x2 block ends at (3, 3) and the 4x4 block starts at (4, 4): they touch only by a corner.
    mask, scores = _image_with_blocks([((2, 2), 2, DETECTED_2X2), ((4, 4), 4, MISSED_4X4)])
    assert ndimage.label(mask)[1] == 2  # 4-connectivity: two regions, PRO (1 + 0) / 2 = 0.5
    # 8-connectivity: one 20-pixel region, 4 pixels detected, PRO 0.2 at every threshold.
    assert aupro(mask[None], scores[None]) == pytest.approx(0.2, abs=1e-12)


def test_aupro_keeps_regions_of_different_images_apart():
    # The two blocks overlap in position but lie in two images: two regions, PRO (1 + 0) / 2.
    first_mask, first_scores = _image_with_blocks([((2, 2), 2, DETECTED_2X2)])
    second_mask, second_scores = _image_with_blocks([((2, 2), 4, MISSED_4X4)])
    masks, maps = np.stack([first_mask, second_mask]), np.stack([first_scores, second_scores])
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------


def test_shape_mismatch_names_the_arrays():
    labels, scores, masks, maps = _structured_case(seed=3, num_images=4)
    with pytest.raises(ValueError, match=r"masks \(4, 48, 48\) and anomaly_maps \(4, 48, 40\)"):
        compute_metrics(labels, scores, masks, maps[..., :40])
    with pytest.raises(ValueError, match=r"image_labels \(4,\) and image_scores \(3,\)"):
        compute_metrics(labels, scores[:3], masks, maps)
    with pytest.raises(ValueError, match=r"image_labels has 3 images but masks has 4"):
        compute_metrics(labels[:3], scores[:3], masks, maps)


def test_non_binary_and_non_finite_inputs_are_rejected():
    labels, scores, masks, maps = _structured_case(seed=3, num_images=4)
    with pytest.raises(ValueError, match="masks must hold only 0 and 1"):
        compute_metrics(labels, scores, masks * 255, maps)
    with pytest.raises(ValueError, match="image_labels must hold only 0 and 1"):
        compute_metrics(labels + 1, scores, masks, maps)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="anomaly_maps must be finite"):
        compute_metrics(labels, scores, masks, maps)


def test_single_class_labels_give_nan_with_a_warning():
    labels, scores, masks, maps = _structured_case(seed=4)
    anomalous = labels == 1
    with pytest.warns(UndefinedMetricWarning, match="image_labels holds only 1 \\(anomalous\\)"):
        metrics = compute_metrics(labels[anomalous], scores[anomalous], masks[anomalous], maps[anomalous])
    assert all(np.isnan(metrics[name]) for name in ("i_auroc", "i_ap", "i_f1max"))
    assert all(np.isfinite(metrics[name]) for name in ("p_auroc", "p_f1max", "aupro_0.3", "p_ap"))

    with pytest.warns(UndefinedMetricWarning, match="masks holds only 0 \\(normal\\)"):
        metrics = compute_metrics(labels, scores, np.zeros_like(masks), maps)
    assert all(np.isnan(metrics[name]) for name in ("p_auroc", "p_f1max", "aupro_0.3", "p_ap"))
    assert np.isfinite(metrics["i_auroc"])


# ----------------------------------------------------------------------------
# The host and device forms against the frozen scikit-learn implementation
# ----------------------------------------------------------------------------


def _on_devices(labels, scores, masks, maps, num_devices=1):
    """`metrics_on_devices` of one class, its maps split into two batches with padding rows after each, their
    rows split over `num_devices` devices."""
    region_ids, region_counts = region_ids_per_image(masks)
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), (sharding.DATA_AXIS,))
    half = len(labels) // 2
    batches = [[], [], [], []]
    for part in (slice(0, half), slice(half, None)):
        arrays = (maps[part], region_ids[part], region_counts[part], np.ones(len(labels[part]), bool))
        padding = -(-(len(labels[part]) + 1) // num_devices) * num_devices - len(labels[part])
        for batch, array in zip(batches, arrays):
            padded = np.concatenate([array, np.zeros((padding, *array.shape[1:]), array.dtype)])
            batch.append(jax.device_put(padded, sharding.batch_split(mesh)))
    return metrics_on_devices(np.asarray(labels, bool), scores, *batches)


def _on_eight_devices(labels, scores, masks, maps):
    return _on_devices(labels, scores, masks, maps, num_devices=8)


def _random_case(seed=0, num_images=12, size=32):
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % 2
    masks = np.zeros((num_images, size, size), np.uint8)
    for image in np.flatnonzero(labels):
        row, col = rng.integers(0, size - 8, 2)
        masks[image, row : row + rng.integers(1, 8), col : col + rng.integers(1, 8)] = 1
    maps = (rng.random(masks.shape) + 0.6 * masks * rng.random()).astype(np.float32)
    return labels, rng.random(num_images).astype(np.float32), masks, maps


def _adversarial_cases():
    labels, scores, masks, maps = _random_case()
    cases = {"random": (labels, scores, masks, maps), "structured": _structured_case(seed=5)}
    cases["larger"] = _random_case(seed=2, num_images=32, size=128)
    cases["ties"] = (labels, np.round(scores * 3) / 3, masks, np.round(maps * 4) / 4)
    cases["constant maps"] = (labels, np.full_like(scores, 0.5), masks, np.full_like(maps, 0.25))
    one_region = np.zeros_like(masks)
    one_region[1, 3:9, 4:7] = 1
    cases["one region"] = (labels, scores, one_region, maps)
    many = np.zeros_like(masks)
    many[1::2, ::2, ::2] = 1  # isolated pixels: 256 regions an anomalous image
    cases["many regions"] = (labels, scores, many, maps + many)
    cases["signed zeros"] = (labels, scores, masks, np.where(maps > 0.5, 0.0, -0.0).astype(np.float32))
    return cases


@pytest.mark.parametrize("name", list(_adversarial_cases()))
def test_host_and_device_forms_match_the_oracle(name):
    case = _adversarial_cases()[name]
    expected = metrics_oracle.compute_metrics(*case)
    for form in (compute_metrics, _on_devices, _on_eight_devices):
        values = form(*case)
        for metric in METRIC_NAMES:
            assert abs(values[metric] - expected[metric]) <= TOLERANCE[metric], (form.__name__, metric)
    # The host form is float64 throughout: the oracle's values to rounding.
    assert compute_metrics(*case) == pytest.approx(expected, abs=1e-12)


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"fixture {FIXTURE} not present")
def test_device_form_matches_reference_fixture():
    case = np.load(FIXTURE)
    values = _on_devices(case["image_labels"], case["image_scores"], case["masks"], case["anomaly_maps"])
    for name in METRIC_NAMES:
        assert abs(values[name] - float(case[name])) <= TOLERANCE[name], name


@pytest.mark.parametrize("form", [compute_metrics, _on_devices, _on_eight_devices])
def test_undefined_metrics_are_nan_with_the_oracles_warning(form):
    labels, scores, masks, maps = _random_case(seed=1)
    for case, message in [
        ((labels, scores, np.zeros_like(masks), maps), "masks holds only 0 \\(normal\\)"),
        ((labels[1::2], scores[1::2], masks[1::2], maps[1::2]), "image_labels holds only 1 \\(anomalous\\)"),
    ]:
        with pytest.warns(UndefinedMetricWarning, match=message):
            expected = metrics_oracle.compute_metrics(*case)
        with pytest.warns(UndefinedMetricWarning, match=message):
            values = form(*case)
        for name in METRIC_NAMES:
            assert np.isnan(values[name]) == np.isnan(expected[name]), name
            if not np.isnan(expected[name]):
                assert abs(values[name] - expected[name]) <= TOLERANCE[name], name


def test_device_form_gathers_only_the_anomalous_scores():
    """On 8 devices the only all-gather is of the padded anomalous scores: no device holds another's maps."""
    mesh = sharding.data_mesh()
    split = sharding.batch_split(mesh)
    rows, size, anomalous_slots = 16, 32, 64
    pixels = [
        [jax.ShapeDtypeStruct(shape, dtype, sharding=split)]
        for shape, dtype in [
            ((rows, size, size), np.float32),
            ((rows, size, size), np.int16),
            ((rows,), np.int32),
            ((rows,), np.bool_),
        ]
    ]
    positions = jax.ShapeDtypeStruct((99,), np.int32, sharding=sharding.replicated(mesh))
    compiled = (
        device_pixel_metrics.trace(*pixels, positions, mesh=mesh, anomalous_slots=anomalous_slots, region_slots=8)
        .lower()
        .compile()
    )
    gathered = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", compiled.as_text())
    assert gathered == [("s32", str(mesh.size * anomalous_slots))]
