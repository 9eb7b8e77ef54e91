"""Calibration's thresholds and normalisation, on made-up scores."""

import numpy as np
import pytest

from unimmad_jax import calibrate


@pytest.mark.parametrize("count", [1, 2, 3, 10, 57])
@pytest.mark.parametrize("quantile", [0.5, 0.99, 0.999999])
def test_good_only_calibration_never_flags_every_good_image(count, quantile):
    rng = np.random.default_rng(count)
    for scores in (rng.normal(1.0, 0.1, count), np.full(count, 0.7), rng.choice([0.5, 0.6], count)):
        scores = scores.astype(np.float32)
        entry = calibrate.statistics_entry(np.zeros(count, np.int32), scores, quantile)
        flagged = scores >= np.float32(entry["threshold"])
        assert not flagged.all(), (scores, entry)
        assert entry["method"] == f"good_q{quantile:g}" and entry["threshold"] > entry["minimum"]


def test_f1_threshold_flags_the_set_of_best_f1_midway():
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.2, 0.3, 0.5, 0.55, 0.6, 0.9, 0.35], np.float32)
    threshold = calibrate.f1_threshold(labels, scores)
    # Flagging {0.5, 0.55, 0.6, 0.9} gives F1 6/7, the best; midway between 0.5 and the 0.35 below it.
    assert threshold == np.float32(0.425)
    f1 = calibrate.decision_metrics(labels, scores >= threshold)["f1"]
    assert f1 == pytest.approx(6 / 7)
    assert calibrate.statistics_entry(labels, scores, 0.99)["method"] == "f1"


def test_f1_threshold_flags_ties_together():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.8, 0.8, 0.8, 0.1], np.float32)
    threshold = calibrate.f1_threshold(labels, scores)
    assert 0.1 < threshold <= 0.8


def test_normalisation_is_monotone_with_half_exactly_at_the_threshold():
    stats = calibrate.Statistics(threshold=1.25, minimum=1.0, maximum=2.0)
    args = (stats.threshold, stats.minimum, stats.maximum)
    assert float(calibrate.normalize(np.float32(1.25), *args)) == 0.5
    assert float(calibrate.normalize(np.float32(1.0), *args)) == 0.0
    assert float(calibrate.normalize(np.float32(2.0), *args)) == 1.0
    below, above = np.nextafter(np.float32(1.25), np.float32(0)), np.nextafter(np.float32(1.25), np.float32(3))
    values = np.sort(np.concatenate([np.linspace(0.5, 2.5, 2001, dtype=np.float32), [below, above]]))
    normalized = np.asarray(calibrate.normalize(values, *args))
    assert np.all(np.diff(normalized) >= 0) and normalized.min() == 0.0 and normalized.max() == 1.0
    np.testing.assert_array_equal(normalized >= 0.5, values >= np.float32(stats.threshold))


def test_overrides_move_the_threshold_and_its_half():
    stats = calibrate.Statistics(threshold=1.25, minimum=1.0, maximum=2.0)
    assert calibrate.override(stats, None, 0.5) == stats
    assert calibrate.override(stats, None, 0.75).threshold == pytest.approx(1.125)  # more sensitive: lower
    assert calibrate.override(stats, None, 0.25).threshold == pytest.approx(1.625)
    moved = calibrate.override(stats, 1.5, None)
    assert float(calibrate.normalize(np.float32(1.5), *(moved.threshold, moved.minimum, moved.maximum))) == 0.5
    with pytest.raises(ValueError, match="at most one"):
        calibrate.override(stats, 1.5, 0.5)
    with pytest.raises(ValueError, match="sensitivity"):
        calibrate.override(stats, None, 1.0)


def test_small_classes_fall_back_to_their_dataset(tmp_path):
    class Config:
        class calibrate:  # noqa: N801 (stands in for config.calibrate)
            good_quantile = 0.9
            min_class_images = 5

    rng = np.random.default_rng(0)
    names = np.array(["big"] * 20 + ["small"] * 3)
    columns = {"label": np.zeros(23, np.int32), "image_score": rng.random(23).astype(np.float32), "class_name": names}
    entry = calibrate.calibrate_dataset(columns, "validation", {"big": ["rgb"], "small": ["gray"]}, Config)
    assert entry["classes"]["big"]["source"] == "class" and entry["classes"]["small"]["source"] == "dataset"
    assert entry["classes"]["small"]["threshold"] == entry["dataset"]["threshold"]
    record = {"datasets": {"d": entry}}
    big, source = calibrate.statistics_for(record, "d", "big")
    assert big.threshold == entry["classes"]["big"]["threshold"] and "class big" in source
    unknown, source = calibrate.statistics_for(record, "d", "")
    assert unknown.threshold == entry["dataset"]["threshold"] and "dataset-level" in source
