"""Eyecandies: RGB + metric depth of synthetic candies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from unimmad_jax.data import readers
from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import InvalidDataError

_LAYOUT = "<Class>/<train|val|test_public>/data/<id>_image_{0..5}.png, _depth.png (16-bit), _info_depth.yaml, _mask.png"
_SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test_public"}
# Lighting 4 (all lights) is the RGB view commonly used for Eyecandies.
_RGB_VIEW = 4
_DEFECT_MASKS = ("bumps", "colors", "dents", "normals")


class Eyecandies(base.FolderBuilder):
    """Eyecandies: 10 classes, RGB (lighting 4) + metric depth.

    The 16-bit depth PNG is de-normalised with ``_info_depth.yaml``
    (``min + png / 65535 * (max - min)``). Eyecandies has no foreground mask, so
    depth is stored as ``wofg_depth`` (centred on the mean of all pixels).
    Labels come from the masks of ``test_public`` (any non-zero pixel is
    anomalous); ``train`` and ``val`` are all good. The defect type lists the
    non-empty per-type masks (``bumps``, ``colors``, ``dents``, ``normals``).
    """

    name = "eyecandies"
    HOMEPAGE = "https://eyecan-ai.github.io/eyecandies/"
    TRAIN_CLASSES = dict.fromkeys(
        (
            "CandyCane",
            "ChocolateCookie",
            "ChocolatePraline",
            "Confetto",
            "GummyBear",
            "HazelnutTruffle",
            "LicoriceSandwich",
            "Lollipop",
            "Marshmallow",
            "PeppermintCandy",
        ),
        base.TrainClass(2, 1000),  # RGB + depth
    )
    TRAIN_CLASSES_SOURCE = "Bonfiglioli et al., The Eyecandies Dataset, ACCV 2022: 1,000 training samples per class"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the class archives of Eyecandies from {HOMEPAGE} (download page),
    extract them side by side and pass the folder holding CandyCane/,
    ChocolateCookie/, ... as --manual-dir. Expected layout: {_LAYOUT}.
    """

    def _list_folder(self, root: Path):
        samples = {split: [] for split in _SPLIT_FOLDERS}
        for class_dir in base.class_folders(root, "train", self.MANUAL_DOWNLOAD_INSTRUCTIONS):
            for split, folder in _SPLIT_FOLDERS.items():
                split_samples = _list_split(root, class_dir, class_dir / folder / "data", labelled=split == "test")
                if split == "train":
                    base.require_training_images(split_samples, class_dir / folder)
                samples[split].extend(split_samples)
        return samples

    def _read_depth(self, path: Path, modality_type: str) -> np.ndarray:
        return read_depth(path, path.with_name(path.name.replace("_depth.png", "_info_depth.yaml")))


def _list_split(root: Path, class_dir: Path, data_dir: Path, labelled: bool):
    samples = []
    for depth in base.sorted_files(data_dir, "*_depth.png"):
        sample_id = depth.name[: -len("_depth.png")]
        rgb = data_dir / f"{sample_id}_image_{_RGB_VIEW}.png"
        if not rgb.is_file():
            raise InvalidDataError(f"Missing image {rgb} for depth {depth}.")
        mask = data_dir / f"{sample_id}_mask.png"
        label, defect = _label(data_dir, sample_id, mask) if labelled else (0, "good")
        samples.append(
            base.SampleFiles(
                class_name=class_dir.name,
                defect_type=defect,
                label=label,
                modalities=(("rgb", rgb), ("wofg_depth", depth)),
                mask=mask if label else None,
                source=base.relative(rgb, root),
            )
        )
    return samples


def _label(data_dir: Path, sample_id: str, mask: Path) -> tuple[int, str]:
    if not mask.is_file():
        raise InvalidDataError(f"Missing ground truth {mask} of a test sample.")
    if not readers.read_mask(mask).any():
        return 0, "good"
    defects = [
        kind
        for kind in _DEFECT_MASKS
        if (data_dir / f"{sample_id}_{kind}_mask.png").is_file()
        and readers.read_mask(data_dir / f"{sample_id}_{kind}_mask.png").any()
    ]
    return 1, "+".join(defects) or "anomalous"


def read_depth(png: Path, info: Path) -> np.ndarray:
    """A 16-bit Eyecandies depth PNG in metres, with an all-ones foreground."""
    raw = base.read_sixteen_bit_png(png)
    low, high = _normalization(info)
    depth = low + raw.astype(np.float32) / 65535.0 * (high - low)
    return readers.with_foreground(depth, np.ones_like(depth))


def _normalization(info: Path) -> tuple[float, float]:
    try:
        content = yaml.safe_load(info.read_text())
        return float(content["normalization"]["min"]), float(content["normalization"]["max"])
    except FileNotFoundError as error:
        raise InvalidDataError(f"Missing depth info {info}.") from error
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        raise InvalidDataError(f"{info} lacks normalization: {{min, max}} ({error}).") from error
