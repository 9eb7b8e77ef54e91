"""MVTec 3D-AD: RGB + depth (the z channel of the organised point cloud)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unimmad_jax.data import readers
from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import SPLITS, InvalidDataError

_LAYOUT = "<class>/{train,validation,test}/<good|defect>/{rgb/*.png, xyz/*.tiff, gt/*.png}"


class Mvtec3d(base.FolderBuilder):
    """MVTec 3D-AD: 10 classes, RGB + depth from xyz TIFFs, defect-id masks.

    Depth is the z channel of ``xyz/*.tiff``; the foreground is every point with
    a non-zero coordinate (missing points are (0, 0, 0)). Good test images have
    an all-zero ``gt``; good train/validation images have none and get an
    all-zero mask.
    """

    name = "mvtec3d"
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"
    TRAIN_CLASSES = {
        name: base.TrainClass(2, samples)  # RGB + depth
        for name, samples in {
            "bagel": 244,
            "cable_gland": 223,
            "carrot": 286,
            "cookie": 210,
            "dowel": 288,
            "foam": 236,
            "peach": 361,
            "potato": 300,
            "rope": 298,
            "tire": 210,
        }.items()
    }
    TRAIN_CLASSES_SOURCE = "Bergmann et al., The MVTec 3D-AD Dataset, VISAPP 2022, Table 1"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download mvtec_3d_anomaly_detection.tar.xz from {HOMEPAGE} (free
    registration), extract it, and pass the extracted folder (the one holding
    bagel/, cable_gland/, ...) as --manual-dir. Expected layout: {_LAYOUT}.
    """

    def _list_folder(self, root: Path):
        samples = {split: [] for split in SPLITS}
        for class_dir in base.class_folders(root, "train", self.MANUAL_DOWNLOAD_INSTRUCTIONS):
            for split in SPLITS:  # the split folders carry the split names
                split_samples = _list_split(root, class_dir, class_dir / split)
                if split == "train":
                    base.require_training_images(split_samples, class_dir / split)
                samples[split].extend(split_samples)
        return samples

    def _read_depth(self, path: Path, modality_type: str) -> np.ndarray:
        return readers.read_xyz_depth(path)


def _list_split(root: Path, class_dir: Path, split_dir: Path):
    if not split_dir.is_dir():
        return []
    samples = []
    for defect_dir in base.subfolders(split_dir):
        defect = defect_dir.name
        for rgb in base.sorted_files(defect_dir / "rgb", "*.png"):
            xyz = defect_dir / "xyz" / f"{rgb.stem}.tiff"
            if not xyz.is_file():
                raise InvalidDataError(f"Missing point cloud {xyz} for image {rgb}.")
            samples.append(
                base.SampleFiles(
                    class_name=class_dir.name,
                    defect_type=defect,
                    label=int(defect != "good"),
                    modalities=(("rgb", rgb), ("depth", xyz)),
                    mask=_mask_file(defect_dir, rgb, defect),
                    source=base.relative(rgb, root),
                )
            )
    return samples


def _mask_file(defect_dir: Path, rgb: Path, defect: str) -> Path | None:
    mask = defect_dir / "gt" / rgb.name
    if mask.is_file():
        return mask
    if defect == "good":
        return None
    raise InvalidDataError(f"Missing ground truth {mask} for defective image {rgb}.")
