"""The `folder` dataset (your own data): a folder of synthetic images prepared, trained on and evaluated through the
command line, the depth files it reads, and bad layouts and files named."""

from __future__ import annotations

import json
import re
import shutil

import data_fakes as fakes
import numpy as np
import PIL.Image
import pytest
import tifffile
from helpers import load_config, run_main

from unimmad_jax.data import prepared, schema
from unimmad_jax.data.__main__ import main
from unimmad_jax.data.builders import synthetic
from unimmad_jax.data.pipeline import train_loader

DATASET = "folder/mine"


def _prepare(manual_dir, data_dir, name=DATASET) -> int:
    return main(["prepare", "--dataset", name, "--manual-dir", str(manual_dir), "--data-dir", str(data_dir)])


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """2 RGB + depth classes of synthetic images laid out as a folder dataset, with a validation split."""
    return synthetic.write_folder(tmp_path_factory.mktemp("raw") / "mine")


@pytest.fixture(scope="module")
def data_dir(synthetic_folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("prepared")
    assert _prepare(synthetic_folder, data_dir) == 0
    return data_dir


def test_folder_is_prepared_as_folder_slash_name(data_dir, capsys):
    assert prepared.find_prepared(data_dir)[DATASET] == data_dir / "folder" / "mine" / "1.0.0"
    capsys.readouterr()
    assert main(["summary", "--data-dir", str(data_dir), "--json"]) == 0
    counts = {"train": (8, 0), "validation": (2, 2), "test": (4, 4)}
    assert json.loads(capsys.readouterr().out) == {
        DATASET: {
            split: {c: {"good": good, "anomalous": bad, "modalities": ["rgb", "depth"]} for c in ("plate", "tiles")}
            for split, (good, bad) in counts.items()
        }
    }


def test_records_hold_the_files_depth_in_metres_and_masks(data_dir, synthetic_folder):
    split = prepared.open_split(data_dir, DATASET, "test")
    records = [split.records[i] for i in range(len(split))]
    assert {schema.decode_text(r["dataset"]) for r in records} == {DATASET}
    crack = next(r for r in records if schema.decode_text(r["path"]) == "tiles/test/crack/rgb/006.png")
    folder = synthetic_folder / "tiles/test/crack"
    assert crack["label"] == 1 and [schema.decode_text(t) for t in crack["modality_types"]] == ["rgb", "depth"]
    np.testing.assert_array_equal(crack["images"][0], np.asarray(PIL.Image.open(folder / "rgb/006.png")))
    millimetres = np.asarray(PIL.Image.open(folder / "depth/006.png")).astype(np.float32)
    (depth,) = crack["depths"]
    np.testing.assert_allclose(depth[..., 0], millimetres / 1000.0, rtol=1e-6)
    np.testing.assert_array_equal(depth[..., 1], millimetres > 0)
    mask = np.asarray(PIL.Image.open(folder / "mask/006.png"))
    assert mask.any()
    np.testing.assert_array_equal(crack["mask"][..., 0], mask)
    good = [r for r in records if r["label"] == 0]
    assert len(good) == 8 and not any(r["mask"].any() for r in good)


def test_loss_weight_is_1_unless_listed_by_the_full_name(data_dir):
    config = load_config("tiny").data
    config.data_dir, config.datasets = str(data_dir), (DATASET,)
    batch = next(train_loader(config, seed=0, batch_size=8).iterator)
    np.testing.assert_array_equal(batch["loss_weight"], 1.0)
    config.loss_weights[DATASET] = 2.5
    batch = next(train_loader(config, seed=0, batch_size=8).iterator)
    np.testing.assert_array_equal(batch["loss_weight"], 2.5)


def test_train_and_evaluate_through_the_command_line(data_dir, tmp_path):
    fields = {"data.datasets": f'("{DATASET}",)', "train.num_epochs": 1, "train.eval_every_epochs": 1}
    training = run_main(tmp_path, data_dir, **fields)
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["datasets"][DATASET]["split"] == "validation"
    assert f"| {DATASET} | plate | validation" in training
    evaluation = run_main(tmp_path, data_dir, "--mode=eval", **fields)
    for class_name in ("plate", "tiles", "mean"):
        assert f"{DATASET:<18} {class_name}" in evaluation
    summary = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert set(summary["datasets"][DATASET]["classes"]) == {"plate", "tiles"}


def test_slots_follow_rgb_gray_infrared_depth_and_tiffs_are_read(tmp_path):
    """gray + infrared + xyz TIFF depth in one class, gray + one-channel TIFF depth in another."""
    root = tmp_path / "raw"
    plane = fakes.xyz_array(0.5)[..., 2].copy()
    plane[0, :] = np.nan  # not measured, as are the zeros of the border
    for split, defect in (("train", "good"), ("test", "good"), ("test", "dent")):
        for class_name, depth_file in (("xyz", "000.tiff"), ("plane", "000.tif")):
            folder = root / class_name / split / defect
            fakes.save_png(folder / "gray" / "000.png", fakes.rgb_array(40)[..., 0])
            if class_name == "xyz":
                fakes.save_png(folder / "infrared" / "000.jpg", fakes.rgb_array(90))
                fakes.save_tiff(folder / "depth" / depth_file, fakes.xyz_array(0.5))
            else:
                (folder / "depth").mkdir()
                tifffile.imwrite(folder / "depth" / depth_file, plane)
            if defect != "good":
                fakes.save_png(folder / "mask" / "000.png", fakes.defect_mask(1))
    # The spelling, `--dataset folder --name NAME`, is the same dataset as `--dataset folder/NAME`.
    arguments = ["prepare", "--dataset", "folder", "--name", "tiffs", "--manual-dir", str(root)]
    assert main([*arguments, "--data-dir", str(tmp_path / "out")]) == 0
    split = prepared.open_split(tmp_path / "out", "folder/tiffs", "test")
    assert split.index.modality_types == (("gray", "depth"),) * 2 + (("gray", "infrared", "depth"),) * 2
    (from_xyz,) = split.records[2]["depths"]
    xyz = fakes.xyz_array(0.5)
    np.testing.assert_array_equal(from_xyz[..., 0], xyz[..., 2])
    np.testing.assert_array_equal(from_xyz[..., 1], np.any(xyz != 0, axis=-1))
    (from_plane,) = split.records[0]["depths"]
    measured = np.isfinite(plane) & (plane != 0)
    np.testing.assert_array_equal(from_plane[..., 1], measured)
    np.testing.assert_array_equal(from_plane[..., 0], np.where(measured, plane, 0))


def _corrupt(path):
    path.write_bytes(b"not a png")


def _eight_bit(path):
    fakes.save_png(path, np.ones((synthetic.SIZE, synthetic.SIZE), np.uint8))


# Each class of the damaged folder: test/good/000-002, test/stain/003, test/bump/004, test/crack/005.
DAMAGES = {
    "corrupt png": (_corrupt, "plate/test/crack/rgb/005.png", r"Corrupt or unreadable image .*crack/rgb/005\.png"),
    "missing mask": (lambda p: p.unlink(), "tiles/test/stain/mask/003.png", r"Missing mask .*stain/mask/003\.png"),
    "defect in train": (
        lambda p: p.rename(p.parents[1] / "train" / "stain"),
        "tiles/test/stain",
        r"tiles/train/stain: the train split holds only good samples",
    ),
    "missing depth": (lambda p: p.unlink(), "plate/test/crack/depth/005.png", r"Missing depth file .*depth/005\.\*"),
    "8-bit depth": (_eight_bit, "plate/test/crack/depth/005.png", r"Depth image .*crack/depth/005\.png is uint8"),
    "unknown modality": (lambda p: p.rename(p.parent / "color"), "plate/test/good/rgb", r"Unknown modality .*/color"),
    "modalities differ": (
        shutil.rmtree,
        "plate/test/good/depth",
        r"class folder .*plate have different modalities",
    ),
    "unknown split": (lambda p: p.rename(p.parent / "val"), "plate/test", r"Unknown split folder .*plate/val"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_folders_and_files_are_named_with_rc_2(tmp_path, capsys, damage):
    change, relative, message = DAMAGES[damage]
    root = synthetic.write_folder(tmp_path / "mine", num_train=1, num_validation=0, num_test=3)
    change(root / relative)
    capsys.readouterr()
    assert _prepare(root, tmp_path / "out") == 2
    assert re.search(message, capsys.readouterr().err)
