"""TFDS builders of every supported dataset, and `prepare` to run them.

The builders are not registered with TFDS (to stay clear of names in its
catalog); prepared data is read back by path with
``tfds.builder_from_directory`` (see `unimmad_jax.data.prepared`), which needs
no builder code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import tensorflow_datasets as tfds

from unimmad_jax.data.builders.base import (
    ExampleBuilder,
    FolderBuilder,
    NamedFolderBuilder,
    TrainClass,
    check_manual_dir,
)
from unimmad_jax.data.builders.eyecandies import Eyecandies
from unimmad_jax.data.builders.folder import Folder
from unimmad_jax.data.builders.mmad_meta import MmadMeta
from unimmad_jax.data.builders.mulsen_ad import MulsenAd
from unimmad_jax.data.builders.mvtec3d import Mvtec3d
from unimmad_jax.data.builders.mvtec_ad import MvtecAd
from unimmad_jax.data.builders.synthetic import Synthetic, SyntheticHard
from unimmad_jax.data.builders.visa import Visa
from unimmad_jax.data.schema import InvalidDataError

BUILT_IN = ("synthetic", "synthetic_hard")
"""Datasets that need no download: prepared on the fly when missing."""

BUILDERS: dict[str, type[ExampleBuilder]] = {
    cls.name: cls for cls in (Mvtec3d, Eyecandies, MulsenAd, MvtecAd, Visa, MmadMeta, Folder, Synthetic, SyntheticHard)
}


def make_builder(name: str, data_dir: str | Path) -> ExampleBuilder:
    """The builder of `name` ('mvtec3d', ..., 'mmad_meta/<dataset>', 'folder/<name>')."""
    base_name, _, sub_name = name.partition("/")
    if base_name not in BUILDERS:
        raise InvalidDataError(
            f"Unknown dataset {name!r} (--dataset); expected one of {sorted(BUILDERS)}, "
            "with a name after mmad_meta/ and folder/."
        )
    builder_class = BUILDERS[base_name]
    if issubclass(builder_class, NamedFolderBuilder):
        if not sub_name:
            raise InvalidDataError(
                f"--dataset {base_name} needs the name of its dataset: {base_name}/<name>, "
                f"e.g. {base_name}/{builder_class.NAME_EXAMPLE}."
            )
        return builder_class.named(sub_name, data_dir=data_dir)
    if sub_name:
        raise InvalidDataError(f"Dataset {base_name!r} has no sub-datasets ({name!r}).")
    return builder_class(data_dir=data_dir)


def declared_train_classes(name: str) -> tuple[Mapping[str, TrainClass], str]:
    """(class -> `TrainClass`, source) that the builder of `name` declares; an error if it declares none."""
    base_name, _, sub_name = name.partition("/")
    declared = BUILDERS[base_name].declared_train_classes(sub_name) if base_name in BUILDERS else ({}, "")
    if not declared[0]:
        raise InvalidDataError(
            f"Dataset {name!r} is not prepared and its builder declares no training classes: prepare it "
            "(`python -m unimmad_jax.data prepare`) so that its index says what its samples hold."
        )
    return declared


def prepare(name: str, data_dir: str | Path, manual_dir: str | Path | None = None) -> Path:
    """Builds dataset `name` into `data_dir` (array_record) once.

    Args:
      name: a key of BUILDERS, 'mmad_meta/<dataset>' or 'folder/<name>'.
      data_dir: where prepared datasets live (`config.data.data_dir`).
      manual_dir: the downloaded dataset's folder (not used by the built-in datasets).

    Returns:
      The prepared dataset's folder. A dataset already prepared there is reused.
    """
    data_dir = Path(data_dir).expanduser()
    builder = make_builder(name, data_dir)
    download_config = tfds.download.DownloadConfig()
    if isinstance(builder, FolderBuilder):
        manual_dir = None if manual_dir is None else Path(manual_dir).expanduser()
        check_manual_dir(manual_dir, name, builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return Path(builder.data_dir)


def ensure_prepared(names: Sequence[str], data_dir: str | Path) -> None:
    """Prepare the built-in datasets of `names` missing from `data_dir` (process 0; the others wait)."""
    from unimmad_jax.data.prepared import find_prepared

    missing = [name for name in names if name in BUILT_IN and name not in find_prepared(data_dir)]
    if missing and jax.process_index() == 0:
        for name in missing:
            print(f"Preparing the built-in {name} dataset in {data_dir} (once).")
            prepare(name, data_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("datasets prepared")
