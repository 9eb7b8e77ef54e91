"""Evaluation: per-class and pooled metrics from maps left on the devices equal those the host computes, and the
model seen through subsets of its modalities."""

import metrics_oracle
import numpy as np
import pytest
from helpers import load_config

from unimmad_jax import evaluate, report, sharding, weights
from unimmad_jax.config import model_config
from unimmad_jax.metrics import METRIC_NAMES
from unimmad_jax.models.unimmad import UniMMAD

BATCH = 8  # the conftest's 8 simulated devices, one row each
TOLERANCE = {name: 1e-4 if name == "aupro_0.3" else 1e-6 for name in METRIC_NAMES}


def _scored(mesh, names, labels, scores, masks, maps):
    """A `ScoredSplit` of the samples in batches of 8, the last padded."""
    scored = evaluate.ScoredSplit(mesh)
    for first in range(0, names.size, BATCH):
        rows = np.arange(first, first + BATCH)
        valid = rows < names.size
        rows = np.minimum(rows, names.size - 1)
        out = sharding.to_global(
            {"anomaly_map": maps[rows], "image_score": scores[rows]}, mesh, ("anomaly_map", "image_score")
        )
        scored.add(out, {"gt_mask": masks[rows], "label": labels[rows], "valid": valid, "class_name": names[rows]})
    return scored


def _scored_split(mesh):
    """Two classes of 12 and 7 images in batches of 8, a class changing inside a batch, the last padded."""
    rng = np.random.default_rng(0)
    names = np.array(["screw"] * 12 + ["tile"] * 7)
    labels = np.arange(names.size) % 3 == 0
    masks = np.zeros((names.size, 24, 24), np.uint8)
    for image in np.flatnonzero(labels):
        row, col = rng.integers(0, 18, 2)
        masks[image, row : row + 5, col : col + rng.integers(1, 6)] = 1
        masks[image, 20, 1::3] = 1  # isolated pixels: one region each
    maps = (rng.random(masks.shape) + masks * rng.random()).astype(np.float32)
    scores = maps.reshape(names.size, -1).max(axis=1)
    return _scored(mesh, names, labels, scores, masks, maps), {
        name: (labels[names == name], scores[names == name], masks[names == name], maps[names == name])
        for name in ("screw", "tile")
    }


def test_per_class_metrics_on_the_devices_equal_the_hosts(monkeypatch):
    scored, classes = _scored_split(sharding.data_mesh())
    on_host = evaluate.per_class_metrics(scored)
    monkeypatch.setattr(evaluate, "_metrics_on_host", lambda mesh: False)
    on_devices = evaluate.per_class_metrics(scored)
    assert list(on_host) == list(on_devices) == ["screw", "tile"]
    assert scored.columns["label"].size == 19
    for name, case in classes.items():
        expected = metrics_oracle.compute_metrics(*case)
        assert on_host[name] == pytest.approx(expected, abs=1e-12), name
        for metric in METRIC_NAMES:
            assert abs(on_devices[name][metric] - expected[metric]) <= TOLERANCE[metric], (name, metric)


@pytest.mark.parametrize("form", ["host", "devices"])
def test_pooled_auroc_ranks_every_class_in_one_curve(form, monkeypatch):
    """Each class alone is separated perfectly (AUROC 1), but class b's normal scores lie above class a's
    anomalous ones: pooled, I-AUROC is 3 of 4 pairs and P-AUROC (4 * 28 + 4 * 56) / (8 * 56), both 0.75."""
    names = np.array(["a", "a", "b", "b"])
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    masks = np.zeros((4, 4, 4), np.uint8)
    masks[[1, 3], 1:3, 1:3] = 1  # 4 anomalous and 28 normal pixels a class
    normal_level = np.array([0.0, 0.0, 0.6, 0.6])[:, None, None]
    maps = np.where(masks, np.array([0.5, 0.5, 1.0, 1.0])[:, None, None], normal_level).astype(np.float32)
    if form == "devices":
        monkeypatch.setattr(evaluate, "_metrics_on_host", lambda mesh: False)
    scored = _scored(sharding.data_mesh(), names, labels, scores, masks, maps)
    per_class = evaluate.per_class_metrics(scored)
    pooled = evaluate.pooled_metrics(scored)
    assert [per_class[name][metric] for name in "ab" for metric in evaluate.POOLED_METRICS] == [1.0] * 4
    assert pooled == pytest.approx({"i_auroc": 0.75, "p_auroc": 0.75}, abs=1e-12)

    markdown = report.summary_markdown(report.summarize_metrics({"D": per_class}, {"D": pooled}))
    assert "| D | mean | 100.00 | " in markdown
    assert "| D | pooled (one curve) | 75.00 | - | - | 75.00 | - | - | - |" in markdown


def test_keep_modalities_marks_the_others_missing_and_zeroes_them():
    batch = {
        "specific_images": np.ones((3, 3, 2, 2, 3), np.float32),
        "modality_mask": np.array([[True, True, False], [True, False, False], [True, True, True]]),
        "modality_types": np.array(["rgb,depth", "gray", "gray,infrared,depth"]),
    }
    kept = evaluate.keep_modalities(batch, frozenset({"depth"}))
    expected = np.array([[False, True, False], [False, False, False], [False, False, True]])
    np.testing.assert_array_equal(kept["modality_mask"], expected)
    np.testing.assert_array_equal(kept["specific_images"].sum(axis=(2, 3, 4)), 12.0 * expected)
    assert kept["modality_types"] is batch["modality_types"]


def test_unknown_modality_names_the_field_and_the_known_names():
    config = load_config("tiny")
    config.eval.modality_subsets = ("rgb", "rgb+thermal")
    with pytest.raises(ValueError, match=r"config.eval.modality_subsets: 'rgb\+thermal'.*\['thermal'\].*rgb, gray"):
        evaluate.modality_subsets(config)


def test_modality_subsets_of_the_trained_model(trained_workdir, synthetic_data_dir):
    """tiles has rgb + depth, brain_scan gray: all of a class's modalities give the full evaluation's values."""
    config = load_config("tiny")
    config.data.data_dir = str(synthetic_data_dir)
    config.eval.modality_subsets = ("rgb+depth", "depth", "gray")
    mesh = sharding.data_mesh()
    model, variables = UniMMAD(model_config(config)), weights.evaluated_variables(config, trained_workdir, mesh)
    full = evaluate.evaluate(model, variables, config, mesh, progress=False)["datasets"]["synthetic"]["classes"]
    subsets = evaluate.modality_subsets(config)
    table = evaluate.evaluate_modality_subsets(model, variables, config, mesh, subsets, progress=False)

    entry = table["datasets"]["synthetic"]
    assert list(entry["classes"]) == ["tiles", "brain_scan"]
    assert entry["classes"]["tiles"]["rgb+depth"] == pytest.approx(full["tiles"], abs=1e-6)
    assert entry["classes"]["brain_scan"]["gray"] == pytest.approx(full["brain_scan"], abs=1e-6)
    assert entry["classes"]["tiles"]["gray"] is None and entry["classes"]["brain_scan"]["depth"] is None
    depth_only = entry["classes"]["tiles"]["depth"]
    assert depth_only["p_auroc"] != pytest.approx(full["tiles"]["p_auroc"], abs=1e-4)
    assert entry["mean"]["depth"] == {"num_classes": 1, "metrics": depth_only}
    markdown = report.modality_subsets_markdown(table)
    assert "| synthetic | brain_scan | depth | n/a | n/a |" in markdown
    assert f"| synthetic | mean (1 of 2 classes) | depth | {report.percent(depth_only['i_auroc'])} |" in markdown
