"""MulSen-AD: RGB + infrared (the point clouds are not used)."""

from __future__ import annotations

import csv
from pathlib import Path

from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import InvalidDataError

_LAYOUT = "<class>/{RGB,Infrared}/{train,test/<defect>}/N.png, <class>/{RGB,Infrared}/GT/<defect>/{N.png, data.csv}"


class MulsenAd(base.FolderBuilder):
    """MulSen-AD: 15 classes, RGB + infrared (read as RGB, ImageNet-normalised).

    RGB and infrared images are paired by file name. ``RGB/GT/<defect>/data.csv``
    holds one row per test object of that defect, in the numeric order of the
    image files (the order the official loader uses): ``object, rgb, infrared,
    pointcloud`` labels. An object is anomalous if any of its three labels is
    1 (the MulSen-AD setting). The mask is the RGB ground truth
    ``RGB/GT/<defect>/N.png``; objects whose defect does not show in RGB have
    none and get an all-zero mask. ``test/good`` needs no ``data.csv``.
    """

    name = "mulsen_ad"
    HOMEPAGE = "https://github.com/ZZZBBBZZZ/MulSen-AD"
    TRAIN_CLASSES = dict.fromkeys(
        (
            "button_cell",
            "capsule",
            "cotton",
            "cube",
            "flat_pad",
            "light",
            "nut",
            "piggy",
            "plastic_cylinder",
            "screen",
            "screw",
            "solar_panel",
            "spring_pad",
            "toothbrush",
            "zipper",
        ),
        base.TrainClass(2, 100),  # RGB + infrared
    )
    TRAIN_CLASSES_SOURCE = "the release's class list; 100 training samples per class ASSUMED (not verified)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download MulSen_AD.rar (links at {HOMEPAGE}), extract it and pass the
    MulSen_AD folder (holding capsule/, cotton/, ...) as --manual-dir. Expected
    layout: {_LAYOUT}.
    """

    def _list_folder(self, root: Path):
        samples = {"train": [], "test": []}
        for class_dir in base.class_folders(root, "RGB", self.MANUAL_DOWNLOAD_INSTRUCTIONS):
            train = _list_files(root, class_dir, "train", "good", labels=None)
            base.require_training_images(train, class_dir / "RGB" / "train")
            samples["train"].extend(train)
            for defect_dir in base.subfolders(class_dir / "RGB" / "test"):
                defect = defect_dir.name
                csv_path = class_dir / "RGB" / "GT" / defect / "data.csv"
                labels = None if defect == "good" else _read_labels(csv_path)
                samples["test"].extend(_list_files(root, class_dir, f"test/{defect}", defect, labels))
        return samples


def _list_files(root, class_dir, folder, defect, labels):
    """Samples of RGB/<folder>/*.png; `labels` per file, None if all good."""
    rgb_files = base.sorted_files(class_dir / "RGB" / folder, "*.png")
    if labels is not None and len(labels) != len(rgb_files):
        raise InvalidDataError(
            f"{class_dir / 'RGB' / 'GT' / defect / 'data.csv'} has {len(labels)} "
            f"rows but {class_dir / 'RGB' / folder} has {len(rgb_files)} images."
        )
    samples = []
    for position, rgb in enumerate(rgb_files):
        infrared = class_dir / "Infrared" / folder / rgb.name
        if not infrared.is_file():
            raise InvalidDataError(f"Missing infrared image {infrared} for {rgb}.")
        mask = class_dir / "RGB" / "GT" / defect / rgb.name
        samples.append(
            base.SampleFiles(
                class_name=class_dir.name,
                defect_type=defect,
                label=0 if labels is None else labels[position],
                modalities=(("rgb", rgb), ("infrared", infrared)),
                mask=mask if labels is not None and mask.is_file() else None,
                source=base.relative(rgb, root),
            )
        )
    return samples


def _read_labels(csv_path: Path) -> list[int]:
    """Object labels of a data.csv: 1 if any modality label is 1."""
    try:
        with csv_path.open(newline="") as file:
            rows = [row for row in csv.reader(file) if row][1:]  # skip the header
        if any(len(row) < 4 for row in rows):
            raise ValueError("a row has fewer than 4 columns")
        return [int(any(int(value) == 1 for value in row[1:4])) for row in rows]
    except FileNotFoundError as error:
        raise InvalidDataError(f"Missing label file {csv_path}.") from error
    except (ValueError, csv.Error) as error:
        raise InvalidDataError(f'{csv_path} is not "object, rgb, infrared, pointcloud" 0/1 labels: {error}') from error
