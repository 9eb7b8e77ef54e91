"""The built-in synthetic datasets: contents, exact masks, determinism, and how hard each is."""

from __future__ import annotations

import time

import numpy as np
import pytest

from unimmad_jax.data import builders, prepared
from unimmad_jax.data.builders import synthetic
from unimmad_jax.data.builders.synthetic import CLASSES, EASY, HARD, SyntheticSample
from unimmad_jax.data.pipeline import default_data_config, eval_loader, train_loader

VARIANTS = {"synthetic": EASY, "synthetic_hard": HARD}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def prepared_variant(request, tmp_path_factory):
    """(name, data_dir, seconds taken to prepare it) of each variant."""
    out = tmp_path_factory.mktemp(request.param)
    start = time.perf_counter()
    builders.prepare(request.param, out)  # needs no manual folder
    return request.param, out, time.perf_counter() - start


def test_prepares_in_seconds(prepared_variant):
    name, _, seconds = prepared_variant
    assert seconds < 60, f"preparing {name} took {seconds:.0f} s"


def test_summary_has_two_domains_and_half_anomalous_tests(prepared_variant):
    name, data_dir, _ = prepared_variant
    summary = prepared.sample_counts(data_dir)[name]
    assert list(summary) == ["train", "test"]
    modalities = {class_name: counts["modalities"] for class_name, counts in summary["test"].items()}
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


def _class_index(class_name):
    return [spec.name for spec in CLASSES].index(class_name)


def _twins(class_name, defect, index, difficulty):
    good = synthetic.render(SyntheticSample(_class_index(class_name), "test", index, "good", difficulty))
    bad = synthetic.render(SyntheticSample(_class_index(class_name), "test", index, defect, difficulty))
    return good, bad


def _changed(image, other):
    return np.any(image != other, axis=-1) if image.ndim == 3 else image != other


@pytest.mark.parametrize("variant", sorted(VARIANTS))
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
def test_masks_are_exactly_the_changed_pixels(variant, class_name, defect, in_rgb, in_depth):
    for index in range(3):
        (good_images, good_depth, good_mask), (images, depth, mask) = _twins(
            class_name, defect, index, VARIANTS[variant]
        )
        assert not good_mask.any() and mask.sum() >= 20
        rgb_changed = _changed(images[0], good_images[0])
        np.testing.assert_array_equal(rgb_changed, mask if in_rgb else np.zeros_like(mask))
        if in_depth is not None:
            depth_changed = np.any(depth != good_depth, axis=-1)
            np.testing.assert_array_equal(depth_changed, mask if in_depth else np.zeros_like(mask))
            assert np.all(depth[mask, 1] == 1)  # defects lie on the object


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendering_is_deterministic(variant):
    sample = SyntheticSample(1, "train", 4, "good", VARIANTS[variant])
    (first,), depth, _ = synthetic.render(sample)
    (again,), depth_again, _ = synthetic.render(sample)
    (other,), _, _ = synthetic.render(SyntheticSample(1, "train", 5, "good", VARIANTS[variant]))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(depth, depth_again)
    assert np.any(first != other)


def _defect_size_and_strength(class_name, defect, difficulty):
    """Mean area (pixels) and mean absolute change inside the mask (grey levels; mm of depth for bumps)."""
    areas, changes = [], []
    for index in range(6):
        (good_images, good_depth, _), (images, depth, mask) = _twins(class_name, defect, index, difficulty)
        if defect == "bump":
            change = 1000 * np.abs(depth[..., 0] - good_depth[..., 0])
        else:
            change = np.abs(images[0].astype(np.float32) - good_images[0].astype(np.float32))
        areas.append(mask.sum())
        changes.append(change[mask].mean())
    return np.mean(areas), np.mean(changes)


@pytest.mark.parametrize(
    "class_name, defect",
    [("tiles", "stain"), ("plate", "bump"), ("foam", "crack"), ("brain_scan", "lesion"), ("lung_scan", "lesion")],
)
def test_hard_defects_are_smaller_and_fainter(class_name, defect):
    easy_area, easy_change = _defect_size_and_strength(class_name, defect, EASY)
    hard_area, hard_change = _defect_size_and_strength(class_name, defect, HARD)
    # the demo model (64 pixels, random prior) misses much smaller or fainter defects altogether
    assert hard_area < 0.85 * easy_area
    assert hard_change < 0.85 * easy_change


@pytest.mark.parametrize("class_name", [spec.name for spec in CLASSES])
def test_hard_normal_samples_vary_more(class_name):
    def spread(difficulty):
        """Mean absolute difference between consecutive good training images of the class."""
        images = [
            synthetic.render(SyntheticSample(_class_index(class_name), "train", i, "good", difficulty))[0][0]
            for i in range(4)
        ]
        return np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(images, images[1:])])

    assert spread(HARD) > 1.3 * spread(EASY)


def test_batches_mix_two_slot_objects_and_one_slot_scans(prepared_variant):
    name, data_dir, _ = prepared_variant
    config = default_data_config()
    config.update(data_dir=str(data_dir), datasets=(name,), image_size=32, num_slots=2, num_read_threads=0)
    loader = train_loader(config, seed=0, batch_size=16)
    assert loader.epoch_size == sum(spec.num_train for spec in CLASSES)
    batch = next(loader.iterator)
    is_scan = np.char.endswith(batch["class_name"].astype(str), "_scan")
    np.testing.assert_array_equal(batch["modality_mask"].sum(axis=1), np.where(is_scan, 1, 2))
    test = next(iter(eval_loader(config, name, batch_size=24)))
    assert list(test["label"]) == [0] * 12 + [1] * 12  # class 'tiles' first
    assert np.all(test["gt_mask"][12:].sum(axis=(1, 2)) > 0)
