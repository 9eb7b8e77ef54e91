"""Your own data: a folder of classes, splits, defects and one folder per modality.

Prepared as ``folder/<name>`` (``--dataset folder/<name> --manual-dir DIR``)::

    DIR/<class>/<split>/<defect>/<modality>/<stem>.<ext>
    DIR/<class>/<split>/<defect>/mask/<stem>.png      # anomalous samples

- ``<split>``: ``train`` (only ``good``), ``test`` and, optionally,
  ``validation`` (the calibration split, `unimmad_jax.calibrate`).
- ``<defect>``: ``good``, or the name of a defect type (anomalous samples).
- ``<modality>``: ``rgb``, ``gray``, ``infrared`` (images: PNG, JPEG, BMP or
  TIFF, read as 8-bit RGB) or ``depth``: a 16-bit PNG (millimetres, 0 where
  nothing was measured; stored in metres), or a TIFF with one channel (depth,
  0 or non-finite where nothing was measured) or three (x, y, z: depth is z,
  read as MVTec 3D-AD's point clouds are). The depth's foreground is where it
  was measured.
- A sample is the files of one ``<stem>`` across the modality folders of its
  defect folder; its slots are its modalities in the order rgb, gray,
  infrared, depth. Every sample of a class has the same modalities.
- ``mask/<stem>.png``: the ground truth of an anomalous sample, in the frame
  of its first slot (non-zero: defective). Good samples need none (all zero).

Files at the top of DIR are ignored (a README); any other file out of place
stops preparation with a message naming it. The records' ``dataset`` field,
the key of the dataset's loss weight, is the full name ``folder/<name>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from unimmad_jax.data import readers
from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import IMAGE_TYPES, SPLITS, InvalidDataError

MODALITY_FOLDERS = (*IMAGE_TYPES, "depth")
"""The modality folders, in slot order."""
MASK_FOLDER = "mask"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEPTH_SUFFIXES = (".png", ".tif", ".tiff")
MILLIMETRES_PER_METRE = 1000.0
_LAYOUT = "<class>/{train,validation,test}/<good|defect>/{rgb,gray,infrared,depth}/<stem>.<ext> and .../mask/<stem>.png"


class Folder(base.NamedFolderBuilder):
    """Your own data (see module docstring)."""

    name = "folder"
    NAME_EXAMPLE = "my_parts"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Lay your data out as {_LAYOUT} (train holds only good/) and pass DIR as
    --manual-dir with --dataset folder/<name>, e.g. folder/my_parts.
    """

    @property
    def dataset_name(self) -> str:
        return f"{self.name}/{self.builder_config.name}"

    def _list_folder(self, root: Path):
        samples = {split: [] for split in SPLITS}
        class_dirs = _folders(root)
        if not class_dirs:
            raise base.layout_error(f"{root} holds no class folder.", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        for class_dir in class_dirs:
            class_samples = _list_class(root, class_dir)
            types = {s.modality_types for split in class_samples.values() for s in split}
            if len(types) > 1:
                raise InvalidDataError(
                    f"The samples of class folder {class_dir} have different modalities {sorted(types)}; "
                    "every sample of a class needs the same modality folders."
                )
            for split, split_samples in class_samples.items():
                samples[split].extend(split_samples)
        return samples

    def _read_depth(self, path: Path, modality_type: str) -> np.ndarray:
        if path.suffix.lower() == ".png":
            millimetres = base.read_sixteen_bit_png(path)
            return readers.with_foreground(millimetres / MILLIMETRES_PER_METRE, millimetres > 0)
        return _read_tiff_depth(path)


def _folders(folder: Path) -> list[Path]:
    return [path for path in base.subfolders(folder) if not path.name.startswith(".")]


def _stray_files(folder: Path, expected: str) -> None:
    """An error naming the first file directly in `folder`, where only folders belong."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            raise InvalidDataError(f"Unexpected file {path}: expected {expected} (layout {_LAYOUT}).")


def _list_class(root: Path, class_dir: Path) -> dict[str, list[base.SampleFiles]]:
    _stray_files(class_dir, "split folders")
    split_dirs = {path.name: path for path in _folders(class_dir)}
    unknown = sorted(set(split_dirs) - set(SPLITS))
    if unknown:
        raise InvalidDataError(f"Unknown split folder {class_dir / unknown[0]}; the splits are {', '.join(SPLITS)}.")
    for split in ("train", "test"):
        if split not in split_dirs:
            raise InvalidDataError(f"Missing folder {class_dir / split}; every class needs train/good and test.")
    samples = {}
    for split, split_dir in split_dirs.items():
        _stray_files(split_dir, "defect folders")
        defect_dirs = _folders(split_dir)
        strays = [d for d in defect_dirs if d.name != "good"] if split == "train" else []
        if strays:
            raise InvalidDataError(f"{strays[0]}: the train split holds only good samples (train/good).")
        samples[split] = [sample for d in defect_dirs for sample in _list_defect(root, class_dir.name, d)]
    base.require_training_images(samples["train"], class_dir / "train")
    return samples


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """`{stem: file}` of `folder`, every file with one of `suffixes` and a stem of its own."""
    files = {}
    for path in base.sorted_files(folder, "*"):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in suffixes:
            raise InvalidDataError(f"Unexpected file {path}: {folder.name} files end in {', '.join(suffixes)}.")
        if path.stem in files:
            raise InvalidDataError(f"Files {files[path.stem]} and {path} are one sample twice (the same stem).")
        files[path.stem] = path
    return files


def _list_defect(root: Path, class_name: str, defect_dir: Path) -> list[base.SampleFiles]:
    _stray_files(defect_dir, f"modality folders ({', '.join(MODALITY_FOLDERS)}) and {MASK_FOLDER}/")
    folders = {path.name: path for path in _folders(defect_dir)}
    unknown = sorted(set(folders) - {*MODALITY_FOLDERS, MASK_FOLDER})
    if unknown:
        raise InvalidDataError(
            f"Unknown modality folder {defect_dir / unknown[0]}; expected {', '.join(MODALITY_FOLDERS)} or "
            f"{MASK_FOLDER}."
        )
    modalities = [m for m in MODALITY_FOLDERS if m in folders]
    if not modalities:
        raise InvalidDataError(f"{defect_dir} holds no modality folder ({', '.join(MODALITY_FOLDERS)}).")
    files = {m: _files_by_stem(folders[m], DEPTH_SUFFIXES if m == "depth" else IMAGE_SUFFIXES) for m in modalities}
    stems = list(dict.fromkeys(stem for by_stem in files.values() for stem in by_stem))  # in natural order
    anomalous = defect_dir.name != "good"
    masks = _files_by_stem(folders[MASK_FOLDER], (".png",)) if anomalous and MASK_FOLDER in folders else {}
    samples = []
    for stem in stems:
        for modality, by_stem in files.items():
            if stem not in by_stem:
                present = next(f[stem] for f in files.values() if stem in f)
                raise InvalidDataError(f"Missing {modality} file {folders[modality] / stem}.* for {present}.")
        first = files[modalities[0]][stem]
        if anomalous and stem not in masks:
            raise InvalidDataError(f"Missing mask {defect_dir / MASK_FOLDER / stem}.png for anomalous sample {first}.")
        samples.append(
            base.SampleFiles(
                class_name=class_name,
                defect_type=defect_dir.name,
                label=int(anomalous),
                modalities=tuple((m, files[m][stem]) for m in modalities),
                mask=masks.get(stem),
                source=base.relative(first, root),
            )
        )
    orphans = sorted(set(masks) - set(stems))
    if orphans:
        raise InvalidDataError(f"Mask {masks[orphans[0]]} belongs to no sample of {defect_dir} (no file of its stem).")
    return samples


def _read_tiff_depth(path: Path) -> np.ndarray:
    """A one-channel depth TIFF (0 or non-finite: not measured), or an x, y, z point cloud (MVTec 3D-AD's)."""
    try:
        with tifffile.TiffFile(path) as tiff:
            shape = tiff.series[0].shape if tiff.series else ()
            channels = shape[-1] if len(shape) == 3 else 1
            plane = tiff.asarray() if channels == 1 else None
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as error:
        raise InvalidDataError(f"Corrupt or unreadable TIFF {path}: {error}") from error
    if plane is None:
        return readers.read_xyz_depth(path)
    if plane.size == 0:
        raise InvalidDataError(f"Corrupt or unreadable TIFF {path}: no image data.")
    if plane.ndim not in (2, 3):
        raise InvalidDataError(f"Depth TIFF {path} has shape {plane.shape}; expected [h, w], [h, w, 1] or [h, w, 3].")
    plane = np.asarray(plane, np.float32).reshape(plane.shape[:2])
    measured = np.isfinite(plane) & (plane != 0)
    return readers.with_foreground(np.where(measured, plane, 0.0), measured)
