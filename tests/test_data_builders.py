"""Builders on fake trees in each official layout, the CLI, and bad inputs."""

from __future__ import annotations

import json
import shutil

import data_fakes as fakes
import numpy as np
import PIL.Image
import pytest

from unimmad_jax.data import builders, prepared, schema
from unimmad_jax.data.__main__ import main
from unimmad_jax.data.pipeline import default_data_config, eval_loader
from unimmad_jax.data.schema import InvalidDataError

FAKE_WRITERS = {
    "mvtec3d": fakes.write_mvtec3d,
    "eyecandies": fakes.write_eyecandies,
    "mulsen_ad": fakes.write_mulsen_ad,
    "mvtec_ad": fakes.write_mvtec_ad,
    "visa": fakes.write_visa,
    "mmad_meta/brats": fakes.write_mmad_meta,
}


def _counts(good, anomalous, modalities):
    return {"good": good, "anomalous": anomalous, "modalities": modalities}


RGBD = ["rgb", "depth"]
EXPECTED_SUMMARY = {
    "eyecandies": {
        "train": {"CandyCane": _counts(3, 0, ["rgb", "wofg_depth"])},
        "validation": {"CandyCane": _counts(1, 0, ["rgb", "wofg_depth"])},
        "test": {"CandyCane": _counts(1, 2, ["rgb", "wofg_depth"])},
    },
    "mmad_meta/brats": {
        "train": {"brain": _counts(2, 0, ["gray", "wofg_depth"]), "part": _counts(2, 0, RGBD)},
        "test": {"brain": _counts(1, 1, ["gray", "wofg_depth"]), "part": _counts(1, 1, RGBD)},
    },
    "mulsen_ad": {
        "train": {"capsule": _counts(3, 0, ["rgb", "infrared"])},
        "test": {"capsule": _counts(1, 2, ["rgb", "infrared"])},
    },
    "mvtec3d": {
        "train": {"bagel": _counts(3, 0, RGBD), "rope": _counts(3, 0, RGBD)},
        "validation": {"bagel": _counts(1, 0, RGBD), "rope": _counts(1, 0, RGBD)},
        "test": {"bagel": _counts(1, 3, RGBD), "rope": _counts(1, 3, RGBD)},
    },
    "mvtec_ad": {
        "train": {"bottle": _counts(3, 0, ["rgb"]), "grid": _counts(2, 0, ["rgb"])},
        "test": {"bottle": _counts(1, 1, ["rgb"]), "grid": _counts(1, 1, ["rgb"])},
    },
    "visa": {
        "train": {"candle": _counts(2, 0, ["rgb"]), "pcb1": _counts(2, 0, ["rgb"])},
        "test": {"candle": _counts(1, 1, ["rgb"]), "pcb1": _counts(1, 1, ["rgb"])},
    },
}


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    for name, write in FAKE_WRITERS.items():
        write(root / name.replace("/", "_"))
    return root


@pytest.fixture(scope="module")
def data_dir(raw_dir, tmp_path_factory):
    """Every fake dataset prepared once, through the CLI."""
    out = tmp_path_factory.mktemp("prepared")
    for name in FAKE_WRITERS:
        manual_dir = raw_dir / name.replace("/", "_")
        args = ["prepare", "--dataset", name, "--manual-dir", str(manual_dir), "--data-dir", str(out)]
        assert main(args) == 0
    return out


def _records(data_dir, name, split):
    split_data = prepared.open_split(data_dir, name, split)
    return [split_data.records[i] for i in range(len(split_data))]


def _text(value):
    return schema.decode_text(value)


def test_summary_json_has_counts_labels_and_modalities(data_dir, capsys):
    capsys.readouterr()
    assert main(["summary", "--data-dir", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED_SUMMARY


def test_summary_table_lists_every_class(data_dir, capsys):
    capsys.readouterr()
    assert main(["summary", "--data-dir", str(data_dir)]) == 0
    table = capsys.readouterr().out
    assert "mmad_meta/brats  test" in table
    assert len(table.strip().splitlines()) == 2 + 23  # header, rule, 23 classes


def test_prepare_again_reuses_the_data(data_dir, raw_dir):
    folder = builders.prepare("visa", data_dir, raw_dir / "visa")
    assert folder == prepared.find_prepared(data_dir)["visa"]


def test_mvtec3d_depth_is_z_with_nonzero_points_as_foreground(data_dir):
    records = _records(data_dir, "mvtec3d", "test")
    crack = next(r for r in records if _text(r["path"]) == "bagel/test/crack/rgb/001.png")
    xyz = fakes.xyz_array(0.5 + 0.1)
    (depth,) = crack["depths"]
    np.testing.assert_array_equal(depth[..., 0], xyz[..., 2])
    np.testing.assert_array_equal(depth[..., 1], np.any(xyz != 0, axis=-1))
    assert crack["images"][0].shape == (fakes.HEIGHT, fakes.WIDTH, 3)
    np.testing.assert_array_equal(crack["mask"][..., 0], fakes.defect_mask(2))  # ids kept
    assert crack["label"] == 1 and _text(crack["defect_type"]) == "crack"


def test_mvtec3d_good_images_without_gt_get_zero_masks(data_dir):
    train = _records(data_dir, "mvtec3d", "train")  # train has no gt folder
    assert all(r["label"] == 0 and not r["mask"].any() for r in train)
    assert train[0]["mask"].shape == (fakes.HEIGHT, fakes.WIDTH, 1)


def test_eyecandies_depth_keeps_16_bits_in_metres(data_dir):
    records = _records(data_dir, "eyecandies", "train")
    low, high = fakes.EYECANDIES_RANGE
    for k, record in enumerate(records):
        (depth,) = record["depths"]
        expected = low + fakes.eyecandies_depth(k) / 65535.0 * (high - low)
        np.testing.assert_allclose(depth[..., 0], expected, rtol=1e-6)
        np.testing.assert_array_equal(depth[..., 1], 1.0)
    # Samples 0 and 1 differ by one 16-bit step: kept, not lost to 8 bits.
    step = records[1]["depths"][0][..., 0] - records[0]["depths"][0][..., 0]
    np.testing.assert_allclose(step, (high - low) / 65535.0, rtol=1e-2)
    # RGB is lighting 4: view v of sample k is filled with 10 k + v.
    assert records[2]["images"][0][0, 0, 0] == 10 * 2 + 4


def test_eyecandies_labels_and_defect_types_come_from_masks(data_dir):
    test = _records(data_dir, "eyecandies", "test")
    assert [r["label"] for r in test] == [0, 1, 1]
    assert [_text(r["defect_type"]) for r in test] == ["good", "dents", "dents"]
    assert not test[0]["mask"].any() and test[1]["mask"].any()


def test_mulsen_ad_labels_from_csv_and_rgb_masks(data_dir):
    test = {_text(r["path"]): r for r in _records(data_dir, "mulsen_ad", "test")}
    good = test["capsule/RGB/test/good/0.png"]
    rgb_defect = test["capsule/RGB/test/hole/0.png"]
    infrared_only = test["capsule/RGB/test/hole/1.png"]
    assert (good["label"], rgb_defect["label"], infrared_only["label"]) == (0, 1, 1)
    assert rgb_defect["mask"].any() and not infrared_only["mask"].any()
    assert [_text(t) for t in rgb_defect["modality_types"]] == ["rgb", "infrared"]
    rgb, infrared = rgb_defect["images"]
    assert (rgb[0, 0, 0], infrared[0, 0, 0]) == (150, 157)  # paired by file name
    assert infrared.shape == (16, 20, 3)  # gray, repeated; its own size


def test_visa_reads_jpg_images_and_id_masks(data_dir):
    config = default_data_config()
    config.update(data_dir=str(data_dir), image_size=20, num_read_threads=0)
    (batch,) = list(eval_loader(config, "visa", batch_size=4))
    assert list(batch["label"]) == [0, 1, 0, 1]
    assert list(batch["class_name"]) == ["candle", "candle", "pcb1", "pcb1"]
    anomalous = batch["gt_mask"][1]
    assert anomalous.max() == 1 and anomalous.sum() > 0  # mask id 1, not 255
    assert batch["gt_mask"][0].sum() == 0


def test_mmad_meta_types_depths_and_dataset_name(data_dir):
    records = _records(data_dir, "mmad_meta/brats", "test")
    brain_bad, part_bad = records[1], records[3]
    assert [_text(t) for t in brain_bad["modality_types"]] == ["gray", "wofg_depth"]
    assert [_text(t) for t in part_bad["modality_types"]] == ["rgb", "depth"]
    expected = fakes.mmad_depth(0.3 + 1)
    np.testing.assert_allclose(part_bad["depths"][0][..., 0], expected[..., 0])
    np.testing.assert_array_equal(part_bad["depths"][0][..., 1], expected[..., -1])
    np.testing.assert_array_equal(brain_bad["depths"][0][..., 1], 1.0)
    assert _text(part_bad["dataset"]) == "brats"
    assert _text(part_bad["defect_type"]) == "tumor"
    np.testing.assert_array_equal(part_bad["mask"][..., 0], fakes.defect_mask(2))


@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_eval_batches_match_the_index(data_dir, name):
    config = default_data_config()
    config.update(data_dir=str(data_dir), image_size=16, num_slots=2, num_read_threads=0)
    index = prepared.read_index(prepared.find_prepared(data_dir)[name]).splits["test"]
    loader = eval_loader(config, name, "test", batch_size=3)
    batches = list(loader)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid]
    mask_mass = np.concatenate([b["gt_mask"].sum(axis=(1, 2)) for b in batches])[valid]
    slots = np.concatenate([b["modality_mask"].sum(axis=1) for b in batches])[valid]
    assert valid.sum() == loader.num_examples == len(index)
    assert list(labels) == list(index.labels)
    assert list(slots) == [len(types) for types in index.modality_types]
    assert np.all(mask_mass[labels == 0] == 0)
    assert batches[0]["specific_images"].shape == (3, 2, 16, 16, 3)
    if name != "mulsen_ad":  # MulSen-AD's infrared-only defect has no RGB mask
        assert np.all(mask_mass[labels == 1] > 0)


def test_odd_image_modes_sizes_and_depth_only_samples(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    palette = PIL.Image.fromarray(fakes.rgb_array(40))
    palette.convert("P", palette=PIL.Image.Palette.ADAPTIVE).save(root / "palette.png")
    fakes.save_png(root / "gray16.png", np.full((8, 12), 200 * 256 + 77, np.uint16))
    np.save(root / "depth.npy", fakes.mmad_depth(0.5)[..., 0])
    entry = {"img_path": ["depth.npy"], "img_type": ["wofg_depth"], "anomaly": 0}
    meta = {
        "train": {
            "scan": [entry, {"img_path": ["palette.png", "gray16.png"], "img_type": ["rgb", "infrared"], "anomaly": 0}]
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    builders.prepare("mmad_meta/odd", tmp_path / "out", root)
    depth_only, two_sizes = _records(tmp_path / "out", "mmad_meta/odd", "train")
    assert len(list(depth_only["images"])) == 0 and len(depth_only["depths"]) == 1
    palette_rgb, gray = two_sizes["images"]
    np.testing.assert_array_equal(palette_rgb, fakes.rgb_array(40))
    assert gray.shape == (8, 12, 3) and np.all(gray == 200)  # the top 8 bits
    config = default_data_config()
    config.update(data_dir=str(tmp_path / "out"), image_size=8, num_read_threads=0)
    batch = next(iter(eval_loader(config, "mmad_meta/odd", "train", batch_size=2)))
    np.testing.assert_array_equal(batch["modality_mask"][:, :2], [[True, False], [True, True]])


# Bad inputs: each must fail with a message naming the culprit.


def _prepare_fails(name, manual_dir, out, match):
    with pytest.raises(InvalidDataError, match=match):
        builders.prepare(name, out, manual_dir)


def test_corrupt_image_is_named(tmp_path):
    root = fakes.write_mvtec_ad(tmp_path / "raw")
    (root / "bottle/train/good/001.png").write_bytes(b"not a png")
    _prepare_fails("mvtec_ad", root, tmp_path / "out", r"Corrupt or unreadable image .*bottle/train/good/001\.png")


def test_corrupt_tiff_is_named(tmp_path):
    root = fakes.write_mvtec3d(tmp_path / "raw", classes=("bagel",))
    (root / "bagel/train/good/xyz/001.tiff").write_bytes(b"II*\x00garbage")
    _prepare_fails("mvtec3d", root, tmp_path / "out", r"Corrupt or unreadable TIFF .*bagel/train/good/xyz/001\.tiff")


def test_mask_of_the_wrong_size_is_named(tmp_path):
    root = fakes.write_mvtec_ad(tmp_path / "raw")
    fakes.save_png(root / "grid/ground_truth/broken/000_mask.png", np.ones((10, 20), np.uint8))
    _prepare_fails(
        "mvtec_ad", root, tmp_path / "out", r"Mask .*grid/ground_truth/broken/000_mask\.png is 20x10 .* 40x30"
    )


def test_depth_without_foreground_is_named(tmp_path):
    root = fakes.write_mvtec3d(tmp_path / "raw", classes=("bagel",))
    fakes.save_tiff(root / "bagel/validation/good/xyz/000.tiff", np.zeros((fakes.HEIGHT, fakes.WIDTH, 3), np.float32))
    _prepare_fails("mvtec3d", root, tmp_path / "out", r"Depth .*bagel/validation/good/xyz/000\.tiff has no foreground")


def test_npy_depth_without_foreground_is_named(tmp_path):
    root = fakes.write_mmad_meta(tmp_path / "raw")
    np.save(root / "part/train/1.npy", np.zeros((fakes.HEIGHT, fakes.WIDTH, 2), np.float32))
    _prepare_fails("mmad_meta/brats", root, tmp_path / "out", r"Depth .*part/train/1\.npy has no foreground")


def test_class_folder_without_training_images_is_named(tmp_path):
    root = fakes.write_mvtec_ad(tmp_path / "raw")
    for image in (root / "grid/train/good").iterdir():
        image.unlink()
    _prepare_fails("mvtec_ad", root, tmp_path / "out", r"Class folder .*grid/train has no training images")


def test_missing_manual_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "not_downloaded"
    _prepare_fails("mvtec3d", missing, tmp_path / "out", r"--manual-dir .*not_downloaded does not exist")
    args = ["prepare", "--dataset", "eyecandies", "--data-dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert "eyecandies needs --manual-dir" in capsys.readouterr().err


def test_folder_laid_out_differently_is_named(tmp_path):
    root = tmp_path / "raw"
    (root / "some_folder").mkdir(parents=True)
    (root / "readme.txt").write_text("not a dataset")
    _prepare_fails("mvtec3d", root, tmp_path / "out", r"raw is not laid out as expected: no <class>/train folder")
    _prepare_fails("visa", root, tmp_path / "out", r"Missing .*raw/split_csv/1cls\.csv")
    _prepare_fails("mmad_meta/brats", root, tmp_path / "out", r"Missing .*raw/meta\.json")
    _prepare_fails("mulsen_ad", root, tmp_path / "out", r"no <class>/RGB folder")


def test_missing_files_of_a_sample_are_named(tmp_path):
    root = fakes.write_mvtec_ad(tmp_path / "mvtec_ad")
    (root / "bottle/ground_truth/broken/000_mask.png").unlink()
    _prepare_fails(
        "mvtec_ad", root, tmp_path / "out", r"Missing ground truth .*bottle/ground_truth/broken/000_mask\.png"
    )
    root = fakes.write_mulsen_ad(tmp_path / "mulsen")
    (root / "capsule/Infrared/train/2.png").unlink()
    _prepare_fails("mulsen_ad", root, tmp_path / "out", r"Missing infrared image .*capsule/Infrared/train/2\.png")
    (root / "capsule/RGB/GT/hole/data.csv").write_text("object,rgb,infrared,pointcloud\n0,1,0,0\n")
    shutil.copy(root / "capsule/RGB/train/1.png", root / "capsule/Infrared/train/2.png")
    _prepare_fails(
        "mulsen_ad", root, tmp_path / "out", r"GT/hole/data\.csv has 1 rows but .*RGB/test/hole has 2 images"
    )


def test_eyecandies_depth_must_be_16_bit(tmp_path):
    root = fakes.write_eyecandies(tmp_path / "raw")
    fakes.save_png(root / "CandyCane/val/data/000_depth.png", np.zeros((fakes.HEIGHT, fakes.WIDTH), np.uint8))
    _prepare_fails("eyecandies", root, tmp_path / "out", r"Depth image .*val/data/000_depth\.png is uint8")


def test_bad_meta_entry_is_named(tmp_path):
    root = fakes.write_mmad_meta(tmp_path / "raw")
    meta = json.loads((root / "meta.json").read_text())
    meta["test"]["part"][0]["img_type"] = ["rgb", "lidar"]
    (root / "meta.json").write_text(json.dumps(meta))
    _prepare_fails(
        "mmad_meta/brats", root, tmp_path / "out", r'meta\.json\["test"\]\["part"\]\[0\]: unknown img_type \'lidar\''
    )


def test_dataset_names_are_checked(tmp_path):
    _prepare_fails("kitti", tmp_path, tmp_path / "out", r"Unknown dataset 'kitti'")
    _prepare_fails(
        "mmad_meta", tmp_path, tmp_path / "out", r"mmad_meta needs the name of its dataset: mmad_meta/<name>"
    )
    _prepare_fails("folder", tmp_path, tmp_path / "out", r"folder needs the name of its dataset: folder/<name>")
    _prepare_fails("folder/my-parts", tmp_path, tmp_path / "out", r"must be a Python identifier .* folder/my_parts")
    with pytest.raises(InvalidDataError, match=r"'mvtec3d' is not prepared in data_dir"):
        prepared.open_split(tmp_path, "mvtec3d", "train")
