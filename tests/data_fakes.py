"""Tiny fake copies of each dataset's official layout, written at test time.

Images are 40 x 30 (W x H, not square). Pixel values encode the sample so
tests can tell samples apart: image ``k`` of a folder is filled with ``10 * k
+ 5`` (plus a per-class offset), and every defect mask marks a known block
with a defect id (1 or 2, not 255).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import tifffile
import yaml

WIDTH, HEIGHT = 40, 30
DEFECT_BLOCK = (slice(5, 12), slice(8, 20))  # rows, cols of every defect


def rgb_array(value: int) -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), value, np.uint8)
    image[..., 1] = (value + 50) % 256
    return image


def defect_mask(defect_id: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[DEFECT_BLOCK] = defect_id
    return mask


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)
    return path


def save_tiff(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="rgb")
    return path


def xyz_array(value: float) -> np.ndarray:
    """A point cloud whose 2-pixel border is missing (all zero)."""
    xyz = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    xyz[2:-2, 2:-2, 0] = xx[2:-2, 2:-2] * 1e-3
    xyz[2:-2, 2:-2, 1] = yy[2:-2, 2:-2] * 1e-3
    xyz[2:-2, 2:-2, 2] = value + 1e-3 * yy[2:-2, 2:-2]
    return xyz


def write_mvtec3d(root: Path, classes=("bagel", "rope"), train=3, validation=1) -> Path:
    """<class>/{train,validation,test}/<good|defect>/{rgb,xyz,gt}."""
    tests = {"good": 1, "crack": 2, "hole": 1}
    for c, class_name in enumerate(classes):
        folders = {"train": {"good": train}, "validation": {"good": validation}, "test": tests}
        for split, defects in folders.items():
            for defect, count in defects.items():
                folder = root / class_name / split / defect
                for k in range(count):
                    save_png(folder / "rgb" / f"{k:03d}.png", rgb_array(10 * k + 5 + 100 * c))
                    save_tiff(folder / "xyz" / f"{k:03d}.tiff", xyz_array(0.5 + 0.1 * k))
                    if split == "test":
                        defect_id = 0 if defect == "good" else k + 1
                        save_png(folder / "gt" / f"{k:03d}.png", defect_mask(defect_id))
    return root


def eyecandies_depth(k: int) -> np.ndarray:
    """A 16-bit depth using the full range (so 8 bits would lose it)."""
    raw = np.linspace(1000, 64000, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH)
    return (raw + k).astype(np.uint16)


EYECANDIES_RANGE = (0.4, 0.9)


def write_eyecandies(root: Path, classes=("CandyCane",), train=3, val=1) -> Path:
    """<Class>/<train|val|test_public>/data/<id>_{image_k,depth,info_depth,mask}."""
    for class_name in classes:
        for split, count in (("train", train), ("val", val), ("test_public", 3)):
            data = root / class_name / split / "data"
            for k in range(count):
                sample = f"{k:03d}"
                for view in range(6):
                    save_png(data / f"{sample}_image_{view}.png", rgb_array(10 * k + view))
                save_png(data / f"{sample}_depth.png", eyecandies_depth(k))
                low, high = EYECANDIES_RANGE
                (data / f"{sample}_info_depth.yaml").write_text(
                    yaml.safe_dump({"normalization": {"min": low, "max": high}})
                )
                anomalous = split == "test_public" and k > 0
                save_png(data / f"{sample}_mask.png", defect_mask(1) if anomalous else defect_mask(0))
                if anomalous:
                    save_png(data / f"{sample}_dents_mask.png", defect_mask(1))
                    save_png(data / f"{sample}_colors_mask.png", defect_mask(0))
    return root


def write_mulsen_ad(root: Path, classes=("capsule",), train=3) -> Path:
    """<class>/{RGB,Infrared}/{train,test/<defect>,GT/<defect>}.

    Infrared images are 20 x 16. test/hole holds 2 objects: 0 is anomalous in
    RGB (with an RGB mask), 1 only in infrared (no RGB mask).
    """
    for class_name in classes:
        # Infrared images are smaller than RGB ones, as from a different sensor.
        for modality, offset, (height, width) in (("RGB", 0, (HEIGHT, WIDTH)), ("Infrared", 7, (16, 20))):
            values = {f"train/{k}.png": 10 * k for k in range(train)}
            values["test/good/0.png"] = 200
            values.update({f"test/hole/{k}.png": 150 + k for k in range(2)})
            for name, value in values.items():
                image = rgb_array(value + offset)[:height, :width, 0]
                save_png(root / class_name / modality / name, image)
        gt = root / class_name / "RGB" / "GT"
        save_png(gt / "hole" / "0.png", defect_mask(1))
        _write_csv(
            gt / "hole" / "data.csv",
            [["object", "rgb", "infrared", "pointcloud"], ["0", "1", "0", "0"], ["1", "0", "1", "0"]],
        )
        _write_csv(gt / "good" / "data.csv", [["object", "rgb", "infrared", "pointcloud"], ["0", "0", "0", "0"]])
        save_png(root / class_name / "Infrared" / "GT" / "hole" / "1.png", defect_mask(1))
    return root


def _write_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def write_mvtec_ad(root: Path, train_counts=None) -> Path:
    """<class>/{train,test}/<defect>/*.png, <class>/ground_truth/<defect>/*_mask.png."""
    train_counts = train_counts or {"bottle": 3, "grid": 2}
    for c, (class_name, train) in enumerate(train_counts.items()):
        gray = class_name == "grid"  # MVTec AD has gray-scale classes
        for k in range(train):
            image = rgb_array(10 * k + 100 * c)
            image = image[..., 0] if gray else image
            save_png(root / class_name / "train" / "good" / f"{k:03d}.png", image)
        save_png(root / class_name / "test" / "good" / "000.png", rgb_array(77))
        save_png(root / class_name / "test" / "broken" / "000.png", rgb_array(88))
        save_png(root / class_name / "ground_truth" / "broken" / "000_mask.png", defect_mask(255))
    return root


def write_visa(root: Path, classes=("candle", "pcb1")) -> Path:
    """split_csv/1cls.csv + <class>/Data/{Images,Masks}; JPG images, PNG masks."""
    rows = [["object", "split", "label", "image", "mask"]]
    for c, class_name in enumerate(classes):
        for k in range(2):
            image = f"{class_name}/Data/Images/Normal/{k:04d}.JPG"
            _save_jpg(root / image, rgb_array(40 * k + 20 * c))
            rows.append([class_name, "train", "normal", image, ""])
        good = f"{class_name}/Data/Images/Normal/0100.JPG"
        _save_jpg(root / good, rgb_array(60))
        rows.append([class_name, "test", "normal", good, ""])
        bad = f"{class_name}/Data/Images/Anomaly/000.JPG"
        mask = f"{class_name}/Data/Masks/Anomaly/000.png"
        _save_jpg(root / bad, rgb_array(90))
        save_png(root / mask, defect_mask(1))
        rows.append([class_name, "test", "anomaly", bad, mask])
    _write_csv(root / "split_csv" / "1cls.csv", rows)
    return root


def _save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path, format="JPEG", quality=95)


def mmad_depth(value: float) -> np.ndarray:
    """[h, w, 3]: depth, an unused channel, foreground (last) without a border."""
    depth = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    depth[..., 0] = value + np.linspace(0, 0.01, WIDTH)[None, :]
    depth[3:-3, 3:-3, 2] = 1.0
    return depth


def write_mmad_meta(root: Path) -> Path:
    """meta.json over an rgb+depth class and a gray+wofg_depth class."""
    meta = {"train": {}, "test": {}}
    for split, count in (("train", 2), ("test", 2)):
        for class_name, types in (("brain", ["gray", "wofg_depth"]), ("part", ["rgb", "depth"])):
            entries = []
            for k in range(count):
                stem = f"{class_name}/{split}/{k}"
                image = save_png(root / f"{stem}.png", rgb_array(30 * k)[..., 0])
                depth = root / f"{stem}.npy"
                array = mmad_depth(0.3 + k) if types[1] == "depth" else mmad_depth(0.3 + k)[..., 0]
                np.save(depth, array)
                anomalous = split == "test" and k == 1
                mask = save_png(root / f"{stem}_mask.png", defect_mask(2)) if anomalous else None
                entries.append(
                    {
                        "img_path": [image.relative_to(root).as_posix(), depth.relative_to(root).as_posix()],
                        "img_type": types,
                        "mask_path": mask.relative_to(root).as_posix() if mask else "",
                        "anomaly": int(anomalous),
                        "specie_name": "tumor" if anomalous else "good",
                        "cls_name": class_name,
                    }
                )
            meta[split][class_name] = entries
    (root / "meta.json").write_text(json.dumps(meta))
    return root
