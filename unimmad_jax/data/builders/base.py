"""What every builder shares: the schema, record order, the index, file reading.

A builder lists its samples first (cheap: file names, CSV/JSON indexes), stores
their index in ``metadata.json``, then encodes them one by one in listing
order. Listing validates the layout; encoding validates the files.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

from unimmad_jax.data import readers, schema
from unimmad_jax.data.schema import InvalidDataError


class SampleSpec(Protocol):
    """What the index needs of a listed sample."""

    class_name: str
    label: int

    @property
    def modality_types(self) -> tuple[str, ...]: ...


@dataclasses.dataclass(frozen=True)
class TrainClass:
    """A class's training split as its source describes it: what sizes the pair budget without the data."""

    modalities: int  # per sample
    samples: int


class ExampleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of all builders (not registered with TFDS: see `builders.prepare`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    HOMEPAGE = ""
    TRAIN_CLASSES: Mapping[str, TrainClass] = {}
    """Class -> its training split, as `TRAIN_CLASSES_SOURCE` says; empty for a builder of the user's own data."""
    TRAIN_CLASSES_SOURCE = ""

    @classmethod
    def declared_train_classes(cls, dataset: str) -> tuple[Mapping[str, TrainClass], str]:
        """(`TRAIN_CLASSES`, source) of dataset `dataset` (the name after the builder's, if any); empty if unknown."""
        del dataset
        return cls.TRAIN_CLASSES, cls.TRAIN_CLASSES_SOURCE

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup imports `importlib_resources`, a backport it only
        # installs on Python < 3.9.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=schema.example_features(),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
            # Record i must be sample i of the index in metadata.json.
            disable_shuffling=True,
        )

    @property
    def dataset_name(self) -> str:
        """The records' `dataset` field (the loss-weight key)."""
        return self.name

    @abc.abstractmethod
    def _list_samples(self, dl_manager: tfds.download.DownloadManager) -> Mapping[str, Sequence[SampleSpec]]:
        """Samples per split (`schema.SPLITS`), in record order."""

    @abc.abstractmethod
    def _encode(self, sample: Any) -> dict[str, Any]:
        """The schema's features of one listed sample."""

    def _split_generators(self, dl_manager):
        samples = {
            split: list(split_samples)
            for split, split_samples in self._list_samples(dl_manager).items()
            if split_samples
        }
        index = schema.DatasetIndex(
            dataset=self.dataset_name,
            splits={
                split: schema.SplitIndex(
                    class_names=tuple(s.class_name for s in split_samples),
                    labels=tuple(int(s.label) for s in split_samples),
                    modality_types=tuple(s.modality_types for s in split_samples),
                )
                for split, split_samples in samples.items()
            },
        )
        self.info.metadata.update(index.to_json())
        return {split: self._generate_examples(split_samples) for split, split_samples in samples.items()}

    def _generate_examples(self, samples: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for key, sample in enumerate(samples):
            yield key, self._encode(sample)


@dataclasses.dataclass(frozen=True)
class SampleFiles:
    """One sample of a manually downloaded dataset."""

    class_name: str
    defect_type: str
    label: int
    modalities: tuple[tuple[str, Path], ...]  # (type, file) in slot order
    mask: Path | None  # None: a good sample without ground truth (all zero)
    source: str  # slot 0's file relative to the manual folder

    @property
    def modality_types(self) -> tuple[str, ...]:
        return tuple(modality_type for modality_type, _ in self.modalities)


class FolderBuilder(ExampleBuilder):
    """A builder reading a dataset the user downloaded into a manual folder.

    Subclasses set MANUAL_DOWNLOAD_INSTRUCTIONS and implement `_list_folder`
    (and `_read_depth` when they have depth modalities). The folder is TFDS's
    manual folder (`tfds.download.DownloadConfig(manual_dir=...)`).
    """

    @abc.abstractmethod
    def _list_folder(self, root: Path) -> Mapping[str, Sequence[SampleFiles]]:
        """Samples per split found under the manual folder `root`."""

    def _read_depth(self, path: Path, modality_type: str) -> np.ndarray:
        """A depth modality file as float32 [h, w, 2] depth + foreground."""
        raise NotImplementedError(f"{self.name} has no depth modality ({path}).")

    def _list_samples(self, dl_manager) -> Mapping[str, Sequence[SampleFiles]]:
        return self._list_folder(Path(dl_manager.manual_dir))

    def _encode(self, sample: SampleFiles) -> dict[str, Any]:
        images, depths, size = [], [], None
        for modality_type, path in sample.modalities:
            if modality_type in schema.IMAGE_TYPES:
                encoded, image_size = readers.encode_image(path)
                images.append(encoded)
            else:
                depth = self._read_depth(path, modality_type)
                readers.check_depth(depth, modality_type, path)
                depths.append(depth)
                image_size = depth.shape[:2]
            size = size or image_size
        if len({depth.shape for depth in depths}) > 1:
            raise InvalidDataError(
                f"The depth modalities of {sample.source} differ in size; the schema "
                "stores the depths of a sample as one array."
            )
        if sample.mask is None:
            mask = np.zeros(size, np.uint8)
        else:
            mask = readers.read_mask(sample.mask)
            if mask.shape != size:
                raise InvalidDataError(
                    f"Mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH) but "
                    f"its image {sample.modalities[0][1]} is {size[1]}x{size[0]}."
                )
        return {
            "modality_types": list(sample.modality_types),
            "images": images,
            "depths": depths,
            "mask": readers.encode_mask(mask),
            "label": sample.label,
            "class_name": sample.class_name,
            "dataset": self.dataset_name,
            "defect_type": sample.defect_type,
            "path": sample.source,
        }


class NamedFolderBuilder(FolderBuilder):
    """A builder of several datasets, one per name: ``<builder>/<name>`` in ``<data_dir>/<builder>/<name>/``."""

    NAME_EXAMPLE = ""  # a name to show in messages, e.g. 'brats'

    @classmethod
    def named(cls, dataset: str, **kwargs) -> NamedFolderBuilder:
        """The builder of dataset ``<cls.name>/<dataset>``."""
        if not dataset.isidentifier():
            raise InvalidDataError(
                f"{cls.name}/{dataset}: the dataset name must be a Python identifier "
                f"(letters, digits, underscores), e.g. {cls.name}/{cls.NAME_EXAMPLE}."
            )
        config = tfds.core.BuilderConfig(name=dataset, description=f"{cls.name}/{dataset}")
        return cls(config=config, **kwargs)


def read_sixteen_bit_png(path: Path) -> np.ndarray:
    """The uint16 ``[h, w]`` values of a 16-bit gray PNG (a depth map)."""
    try:
        with PIL.Image.open(path) as image:
            raw = np.asarray(image)
    except FileNotFoundError as error:
        raise InvalidDataError(f"Missing depth image {path}.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidDataError(f"Corrupt or unreadable depth image {path}: {error}") from error
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise InvalidDataError(
            f"Depth image {path} is {raw.dtype} {list(raw.shape)}; expected a 16-bit one-channel PNG."
        )
    return raw


def check_manual_dir(manual_dir: Path | None, name: str, instructions: str) -> Path:
    """The manual folder, or an error saying what to download and where."""
    if manual_dir is None:
        raise layout_error(
            f"{name} needs --manual-dir (the folder holding the downloaded data).",
            instructions,
        )
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise layout_error(
            f"--manual-dir {manual_dir} does not exist, is not a folder or is empty.",
            instructions,
        )
    return manual_dir


def layout_error(message: str, instructions: str) -> InvalidDataError:
    """An error about the manual folder, followed by how to make it right."""
    return InvalidDataError(f"{message}\n{textwrap.dedent(instructions).strip()}")


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    """Files matching `pattern`, in natural order (2.png before 10.png)."""
    return sorted(
        (path for path in folder.glob(pattern) if path.is_file()),
        key=natural_key,
    )


def natural_key(path: Path) -> tuple[int, int, str]:
    """Numeric names by value first (2 before 10), then the others by name."""
    stem = path.stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir())


def class_folders(root: Path, marker: str, instructions: str) -> list[Path]:
    """Sub-folders of `root` holding `marker`; an error if there is none."""
    folders = [path for path in subfolders(root) if (path / marker).is_dir()]
    if not folders:
        raise layout_error(f"{root} is not laid out as expected: no <class>/{marker} folder.", instructions)
    return folders


def require_training_images(samples: Sequence[SampleFiles], folder: Path) -> None:
    if not samples:
        raise InvalidDataError(f"Class folder {folder} has no training images.")


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
