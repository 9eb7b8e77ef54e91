"""The built-in synthetic dataset: contents, exact masks, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from unimmad_jax.data import builders, prepared
from unimmad_jax.data.builders import synthetic
from unimmad_jax.data.builders.synthetic import CLASSES, SyntheticSample
from unimmad_jax.data.pipeline import default_data_config, eval_loader, train_loader


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    builders.prepare("synthetic", out)  # needs no manual folder
    return out


def test_summary_has_two_domains_and_half_anomalous_tests(data_dir):
    summary = prepared.summarize(data_dir)["synthetic"]
    assert list(summary) == ["train", "test"]
    modalities = {name: counts["modalities"] for name, counts in summary["test"].items()}
    assert modalities == {
        "tiles": ["rgb", "depth"],
        "plate": ["rgb", "depth"],
        "foam": ["rgb", "depth"],
        "brain_scan": ["gray"],
        "lung_scan": ["gray"],
    }
    for spec in CLASSES:
        assert summary["train"][spec.name] == {
            "good": spec.num_train,
            "anomalous": 0,
            "modalities": modalities[spec.name],
        }
        assert summary["test"][spec.name]["good"] == summary["test"][spec.name]["anomalous"] == 12


def _twins(class_name, defect, index):
    class_index = [spec.name for spec in CLASSES].index(class_name)
    good = synthetic.render(SyntheticSample(class_index, "test", index, "good"))
    bad = synthetic.render(SyntheticSample(class_index, "test", index, defect))
    return good, bad


@pytest.mark.parametrize(
    "class_name, defect, in_rgb, in_depth",
    [
        ("tiles", "stain", True, False),
        ("plate", "bump", False, True),
        ("foam", "crack", True, True),
        ("tiles", "crack", True, True),
        ("brain_scan", "lesion", True, None),
        ("lung_scan", "lesion", True, None),
    ],
)
def test_masks_are_exactly_the_changed_pixels(class_name, defect, in_rgb, in_depth):
    for index in range(3):
        (good_images, good_depth, good_mask), (images, depth, mask) = _twins(class_name, defect, index)
        assert not good_mask.any() and mask.sum() >= 20
        rgb_changed = (
            np.any(images[0] != good_images[0], axis=-1) if images[0].ndim == 3 else images[0] != good_images[0]
        )
        np.testing.assert_array_equal(rgb_changed, mask if in_rgb else np.zeros_like(mask))
        if in_depth is not None:
            depth_changed = np.any(depth != good_depth, axis=-1)
            np.testing.assert_array_equal(depth_changed, mask if in_depth else np.zeros_like(mask))
            assert np.all(depth[mask, 1] == 1)  # defects lie on the object


def test_rendering_is_deterministic():
    sample = SyntheticSample(1, "train", 4, "good")
    (first,), depth, _ = synthetic.render(sample)
    (again,), depth_again, _ = synthetic.render(sample)
    (other,), _, _ = synthetic.render(SyntheticSample(1, "train", 5, "good"))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(depth, depth_again)
    assert np.any(first != other)


def test_batches_mix_two_slot_objects_and_one_slot_scans(data_dir):
    config = default_data_config()
    config.update(data_dir=str(data_dir), image_size=32, num_slots=2, num_read_threads=0)
    loader = train_loader(config, seed=0, batch_size=16)
    assert loader.epoch_size == sum(spec.num_train for spec in CLASSES)
    batch = next(loader.iterator)
    is_scan = np.char.endswith(batch["class_name"].astype(str), "_scan")
    np.testing.assert_array_equal(batch["modality_mask"].sum(axis=1), np.where(is_scan, 1, 2))
    test = next(iter(eval_loader(config, "synthetic", batch_size=24)))
    assert list(test["label"]) == [0] * 12 + [1] * 12  # class 'tiles' first
    assert np.all(test["gt_mask"][12:].sum(axis=(1, 2)) > 0)
