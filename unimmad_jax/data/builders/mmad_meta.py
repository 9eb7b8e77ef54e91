"""The authors' preprocessed release: a data root plus a ``meta.json`` index.

``<root>/meta.json`` maps split -> class -> list of entries::

    {"train": {"<class>": [ENTRY, ...], ...},
     "test": {"<class>": [ENTRY, ...], ...}}      # optional "validation"

    ENTRY = {"img_path": ["<rel. path>", ...],     # one file per modality
             "img_type": ["rgb", "depth", ...],    # rgb|gray|infrared|depth|wofg_depth
             "mask_path": "<rel. path>" | "" | null,   # empty: good, all-zero mask
             "anomaly": 0 | 1,
             "specie_name": "<defect type>",       # optional: good/anomalous
             "cls_name": "<class>"}                # optional: the class key

Paths are relative to ``<root>``. Image modalities are PNG/JPEG files; depth
modalities are ``.npy``: ``depth`` is ``[h, w, C>=2]`` with depth in
``[..., 0]`` and a 0/1 foreground in ``[..., -1]``; ``wofg_depth`` is
``[h, w]`` (or depth in ``[..., 0]``). The release holds one such root per
dataset, so each is prepared as ``mmad_meta/<dataset>`` (e.g.
``mmad_meta/brats``); ``<dataset>`` is the records' ``dataset`` field and so
picks the loss weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from unimmad_jax.data import readers
from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import (
    MAX_MODALITIES,
    MODALITY_TYPES,
    SPLITS,
    InvalidDataError,
)

META_FILE = "meta.json"


class MmadMeta(base.NamedFolderBuilder):
    """A dataset of the authors' preprocessed release (see module docstring)."""

    name = "mmad_meta"
    NAME_EXAMPLE = "brats"
    HOMEPAGE = "https://arxiv.org/abs/2509.25934"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the authors' preprocessed data (links in the UniMMAD release),
    extract it, and prepare each dataset folder holding a {META_FILE} as
    --dataset mmad_meta/<name> --manual-dir <that folder>, e.g. mmad_meta/brats.
    """

    RELEASE_TRAIN_CLASSES = {
        "brats": (
            {"brats": base.TrainClass(4, 1000)},
            "ASSUMED: FLAIR, T1, T1ce, T2 (the unified config's 4 slots); 1,000 samples (the release's 'BratsAD1K')",
        ),
        "retinaad": ({"retinal_edema": base.TrainClass(1, 4297)}, "ASSUMED: one OCT scan; BMAD's RESC training set"),
        "liverad": ({"liver": base.TrainClass(1, 1452)}, "ASSUMED: one CT slice; BMAD's liver CT training set"),
        "hyperad": ({"colon": base.TrainClass(1, 1000)}, "ASSUMED: one endoscopy image, 1,000 samples"),
    }
    """The release's datasets by name: (`TRAIN_CLASSES`, source)."""

    @classmethod
    def declared_train_classes(cls, dataset: str):
        return cls.RELEASE_TRAIN_CLASSES.get(dataset, ({}, ""))

    @property
    def dataset_name(self) -> str:
        return self.builder_config.name

    def _list_folder(self, root: Path):
        meta_path = root / META_FILE
        meta = _read_meta(meta_path)
        unknown = set(meta) - set(SPLITS)
        if unknown:
            raise InvalidDataError(f"{meta_path}: unknown splits {sorted(unknown)}; expected {SPLITS}.")
        samples = {}
        for split, classes in meta.items():
            samples[split] = [
                _sample(root, entry, class_name, f'{meta_path}["{split}"]["{class_name}"][{i}]')
                for class_name, entries in classes.items()
                for i, entry in enumerate(entries)
            ]
        for class_name in sorted({s.class_name for split in samples.values() for s in split}):
            base.require_training_images(
                [s for s in samples.get("train", []) if s.class_name == class_name],
                root / f'{META_FILE}["train"]["{class_name}"]',
            )
        return samples

    def _read_depth(self, path: Path, modality_type: str) -> np.ndarray:
        return readers.read_npy_depth(path, modality_type)


def _read_meta(meta_path: Path) -> dict[str, dict[str, list[Any]]]:
    if not meta_path.is_file():
        raise base.layout_error(
            f"Missing {meta_path}: the folder is not laid out as expected.",
            MmadMeta.MANUAL_DOWNLOAD_INSTRUCTIONS,
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidDataError(f"{meta_path} is not valid JSON: {error}") from error


def _sample(root: Path, entry: dict[str, Any], class_key: str, where: str):
    try:
        paths, types = list(entry["img_path"]), list(entry["img_type"])
        label = int(entry["anomaly"])
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidDataError(f"{where} needs img_path, img_type and anomaly ({error!r}).") from error
    if not 1 <= len(paths) <= MAX_MODALITIES or len(paths) != len(types):
        raise InvalidDataError(
            f"{where}: img_path and img_type must list the same 1 to "
            f"{MAX_MODALITIES} modalities (got {len(paths)} and {len(types)})."
        )
    for modality_type in types:
        if modality_type not in MODALITY_TYPES:
            raise InvalidDataError(f"{where}: unknown img_type {modality_type!r}; expected one of {MODALITY_TYPES}.")
    files = [root / path for path in paths]
    for path in files:
        if not path.is_file():
            raise InvalidDataError(f"{where}: missing file {path}.")
    mask = root / entry["mask_path"] if entry.get("mask_path") else None
    if mask is None and label:
        raise InvalidDataError(f"{where}: anomalous sample without mask_path.")
    if mask is not None and not mask.is_file():
        raise InvalidDataError(f"{where}: missing ground truth {mask}.")
    return base.SampleFiles(
        class_name=entry.get("cls_name") or class_key,
        defect_type=entry.get("specie_name") or ("anomalous" if label else "good"),
        label=label,
        modalities=tuple(zip(types, files)),
        mask=mask,
        source=base.relative(files[0], root),
    )
