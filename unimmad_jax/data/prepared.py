"""Finding and opening prepared datasets; what they hold.

A prepared dataset lives in ``<data_dir>/<name>/<version>/`` (or
``<data_dir>/mmad_meta/<dataset>/<version>/``) as TFDS wrote it: array_record
shards, ``features.json``, ``dataset_info.json`` and our ``metadata.json``
index. Reading needs only that folder (``tfds.builder_from_directory``), no
builder code and no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from unimmad_jax.data.schema import SPLITS, DatasetIndex, InvalidDataError, SplitIndex

_INFO_FILE = "dataset_info.json"
_INDEX_FILE = "metadata.json"


def _version_key(folder: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in folder.name.split("."))


def _is_version(folder: Path) -> bool:
    parts = folder.name.split(".")
    return len(parts) == 3 and all(part.isdigit() for part in parts)


def _is_prepared(folder: Path) -> bool:
    """Whether `folder` is a complete dataset version written by our builders."""
    if not (_is_version(folder) and (folder / _INDEX_FILE).is_file()):
        return False
    try:
        read_index(folder)
    except (InvalidDataError, ValueError):  # another TFDS dataset's metadata
        return False
    return True


def find_prepared(data_dir: str | Path) -> dict[str, Path]:
    """Name -> folder (latest version) of every prepared dataset in data_dir."""
    data_dir = Path(data_dir).expanduser()
    found: dict[str, Path] = {}
    # <name>/<version>/ and mmad_meta/<dataset>/<version>/
    infos = [*data_dir.glob(f"*/*/{_INFO_FILE}"), *data_dir.glob(f"*/*/*/{_INFO_FILE}")]
    for info in sorted(infos):
        folder = info.parent
        if not _is_prepared(folder):
            continue
        name = folder.parent.relative_to(data_dir).as_posix()
        if name not in found or _version_key(folder) > _version_key(found[name]):
            found[name] = folder
    return found


def dataset_folder(data_dir: str | Path, name: str) -> Path:
    """The folder of prepared dataset `name`, or an error saying how to make it."""
    folders = find_prepared(data_dir)
    if name not in folders:
        raise InvalidDataError(
            f"Dataset {name!r} is not prepared in data_dir {data_dir} (prepared: "
            f"{sorted(folders) or 'none'}). Run `python -m unimmad_jax.data prepare "
            f"--dataset {name} --manual-dir <downloaded folder> --data-dir {data_dir}`."
        )
    return folders[name]


def read_index(folder: Path) -> DatasetIndex:
    path = folder / _INDEX_FILE
    return DatasetIndex.from_json(json.loads(path.read_text()), str(path))


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """One split of a prepared dataset: random-access records and their index."""

    name: str  # the prepared dataset ('mvtec3d', 'mmad_meta/brats', ...)
    split: str
    dataset: str  # the records' `dataset` field (the loss-weight key)
    records: Sequence[dict[str, Any]]  # a TFDS ArrayRecord data source
    index: SplitIndex

    def __len__(self) -> int:
        return len(self.index)


def _split_index(data_dir: str | Path, name: str, split: str) -> tuple[Path, DatasetIndex]:
    """The folder and index of prepared dataset `name`, which must have `split`."""
    folder = dataset_folder(data_dir, name)
    index = read_index(folder)
    if split not in index.splits:
        raise InvalidDataError(f"Dataset {name!r} has no split {split!r}; it has {sorted(index.splits)}.")
    return folder, index


def open_split(data_dir: str | Path, name: str, split: str) -> PreparedSplit:
    """Opens `split` of prepared dataset `name` for random access."""
    folder, index = _split_index(data_dir, name, split)
    records = tfds.builder_from_directory(str(folder)).as_data_source(split=split)
    if len(records) != len(index.splits[split]):
        raise InvalidDataError(
            f"{folder}: {split} holds {len(records)} records but its index "
            f"{len(index.splits[split])}; prepare the dataset again."
        )
    return PreparedSplit(name, split, index.dataset, records, index.splits[split])


def max_modality_count(data_dir: str | Path, name: str, split: str) -> int:
    """The most modalities a sample of `split` of prepared dataset `name` has."""
    _, index = _split_index(data_dir, name, split)
    return max(len(types) for types in index.splits[split].modality_types)


def class_modalities(data_dir: str | Path, name: str, split: str) -> dict[str, frozenset[str]]:
    """`{class: the modalities every sample of the class has}` of `split` of prepared dataset `name`."""
    _, index = _split_index(data_dir, name, split)
    common: dict[str, frozenset[str]] = {}
    split_index = index.splits[split]
    for class_name, types in zip(split_index.class_names, split_index.modality_types):
        common[class_name] = common.get(class_name, frozenset(types)) & frozenset(types)
    return common


def sample_counts(data_dir: str | Path) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{dataset: {split: {class: {good, anomalous, modalities}}}} of data_dir."""
    counts = {}
    for name, folder in sorted(find_prepared(data_dir).items()):
        index = read_index(folder)
        counts[name] = {split: _split_counts(index.splits[split]) for split in SPLITS if split in index.splits}
    return counts


def _split_counts(index: SplitIndex) -> dict[str, dict[str, Any]]:
    classes: dict[str, dict[str, Any]] = {}
    for class_name, label, types in zip(index.class_names, index.labels, index.modality_types):
        entry = classes.setdefault(class_name, {"good": 0, "anomalous": 0, "modalities": []})
        entry["anomalous" if label else "good"] += 1
        entry["modalities"] += [t for t in types if t not in entry["modalities"]]
    return classes


def format_sample_counts(counts: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    """`sample_counts` as an aligned text table."""
    header = ("dataset", "split", "class", "good", "anomalous", "modalities")
    rows = [
        (name, split, class_name, str(counts["good"]), str(counts["anomalous"]), "+".join(counts["modalities"]))
        for name, splits in counts.items()
        for split, classes in splits.items()
        for class_name, counts in classes.items()
    ]
    if not rows:
        return "No prepared datasets."
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
