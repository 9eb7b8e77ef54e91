"""Evaluation's per-class metrics from maps left on the devices equal those the host computes."""

import metrics_oracle
import numpy as np
import pytest

from unimmad_jax import evaluate, sharding
from unimmad_jax.metrics import METRIC_NAMES

BATCH = 8  # the conftest's 8 simulated devices, one row each
TOLERANCE = {name: 1e-4 if name == "aupro_0.3" else 1e-6 for name in METRIC_NAMES}


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
    scored = evaluate.ScoredSplit(mesh)
    for first in range(0, names.size, BATCH):
        rows = np.arange(first, first + BATCH)
        valid = rows < names.size
        rows = np.minimum(rows, names.size - 1)
        out = sharding.to_global(
            {"anomaly_map": maps[rows], "image_score": scores[rows]}, mesh, ("anomaly_map", "image_score")
        )
        scored.add(out, {"gt_mask": masks[rows], "label": labels[rows], "valid": valid, "class_name": names[rows]})
    return scored, {
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
