"""MVTec AD: RGB only (gray classes are read as RGB)."""

from __future__ import annotations

from pathlib import Path

from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import InvalidDataError

_LAYOUT = "<class>/{train,test}/<defect>/*.png with <class>/ground_truth/<defect>/<name>_mask.png"


class MvtecAd(base.FolderBuilder):
    """MVTec AD: 15 classes, one RGB modality; good test images have no mask."""

    name = "mvtec_ad"
    HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download mvtec_anomaly_detection.tar.xz from {HOMEPAGE} (free
    registration), extract it and pass the extracted folder (holding bottle/,
    cable/, ...) as --manual-dir. Expected layout: {_LAYOUT}.
    """

    def _list_folder(self, root: Path):
        samples = {"train": [], "test": []}
        for class_dir in base.class_folders(root, "train", self.MANUAL_DOWNLOAD_INSTRUCTIONS):
            for split in samples:
                split_samples = _list_split(root, class_dir, split)
                if split == "train":
                    base.require_training_images(split_samples, class_dir / split)
                samples[split].extend(split_samples)
        return samples


def _list_split(root: Path, class_dir: Path, split: str):
    split_dir = class_dir / split
    if not split_dir.is_dir():
        raise InvalidDataError(f"Missing folder {split_dir}; expected {_LAYOUT}.")
    samples = []
    for defect_dir in base.subfolders(split_dir):
        defect = defect_dir.name
        for image in base.sorted_files(defect_dir, "*.png"):
            samples.append(
                base.SampleFiles(
                    class_name=class_dir.name,
                    defect_type=defect,
                    label=int(defect != "good"),
                    modalities=(("rgb", image),),
                    mask=_mask_file(class_dir, defect, image),
                    source=base.relative(image, root),
                )
            )
    return samples


def _mask_file(class_dir: Path, defect: str, image: Path) -> Path | None:
    if defect == "good":
        return None
    mask = class_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
    if not mask.is_file():
        raise InvalidDataError(f"Missing ground truth {mask} for defective image {image}.")
    return mask
