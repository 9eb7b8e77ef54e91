"""The one example schema every builder emits, and the index stored beside it.

A prepared example (one TFDS record) is one object seen through 1 to 4
modalities:

- ``modality_types``: the type of each modality, in slot order
  (``rgb``, ``gray``, ``infrared``, ``depth`` or ``wofg_depth``).
- ``images``: the image modalities (``rgb``/``gray``/``infrared``), in slot
  order, as encoded PNG/JPEG bytes (8-bit RGB or gray; gray decodes repeated to
  3 channels).
- ``depths``: the depth modalities (``depth``/``wofg_depth``), in slot order,
  each a float32 ``[h, w, 2]`` array: depth in ``[..., 0]``, a 0/1 foreground
  in ``[..., 1]`` (all ones for ``wofg_depth``). Depths of one example share a
  size.
- ``mask``: uint8 ``[h, w, 1]`` ground truth in the frame of slot 0; non-zero
  pixels are defective (defect ids are kept where they fit in 8 bits). Good
  samples without a ground-truth file get an all-zero mask.
- ``label`` (0 good, 1 anomalous), ``class_name``, ``dataset`` (the short
  dataset name, also the key of the per-dataset loss weight), ``defect_type``
  and ``path`` (the source file of slot 0, relative to the manual folder).

Slot ``s`` holds the next unused entry of ``images`` or ``depths``, depending
on ``modality_types[s]``; :func:`modality_slots` reassembles them.

The builders store all splits' ``class_name``/``label``/``modality_types`` in
the dataset's ``metadata.json`` (see :class:`SplitIndex`) so that sampling and
summaries never decode records. Records are written in listing order
(shuffling disabled), so record ``i`` is entry ``i`` of the index.

TFDS encodes none of these features with TensorFlow: images are handed over
already encoded, arrays go through ``Tensor(encoding='zlib')``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

IMAGE_TYPES = ("rgb", "gray", "infrared")
DEPTH_TYPES = ("depth", "wofg_depth")
MODALITY_TYPES = IMAGE_TYPES + DEPTH_TYPES
MAX_MODALITIES = 4
SPLITS = ("train", "validation", "test")
LABEL_NAMES = ("good", "anomalous")


class InvalidDataError(ValueError):
    """Input data that cannot be used; the message names the file, key or flag."""


def example_features() -> tfds.features.FeaturesDict:
    """The TFDS features of every prepared dataset."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "modality_types": tfds.features.Sequence(text()),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format=None)),
            "depths": tfds.features.Sequence(
                tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding="zlib")
            ),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=LABEL_NAMES),
            "class_name": text(),
            "dataset": text(),
            "defect_type": text(),
            "path": text(),
        }
    )


def decode_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def modality_slots(example: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(type, array) of each modality of a decoded example, in slot order.

    Image arrays are uint8 ``[h, w, 3]``; depth arrays float32 ``[h, w, 2]``.
    """
    # TFDS decodes an empty sequence of tensors to an empty dict, hence list().
    images = iter(list(example["images"]))
    depths = iter(list(example["depths"]))
    slots = []
    for modality_type in map(decode_text, example["modality_types"]):
        source = images if modality_type in IMAGE_TYPES else depths
        slots.append((modality_type, next(source)))
    return slots


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """What sampling and summaries need of each record of one split."""

    class_names: tuple[str, ...]
    labels: tuple[int, ...]
    modality_types: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict[str, list[Any]]:
        return {
            "class_name": list(self.class_names),
            "label": list(self.labels),
            "modality_types": [list(types) for types in self.modality_types],
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Sequence[Any]]) -> SplitIndex:
        return cls(
            class_names=tuple(value["class_name"]),
            labels=tuple(int(label) for label in value["label"]),
            modality_types=tuple(tuple(t) for t in value["modality_types"]),
        )


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """The ``metadata.json`` of a prepared dataset."""

    dataset: str  # the short name in every record's `dataset` field
    splits: Mapping[str, SplitIndex]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "splits": {name: index.to_json() for name, index in self.splits.items()},
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any], source: str) -> DatasetIndex:
        try:
            return cls(
                dataset=value["dataset"],
                splits={name: SplitIndex.from_json(index) for name, index in value["splits"].items()},
            )
        except (KeyError, TypeError) as error:
            raise InvalidDataError(
                f"{source} is not a unimmad_jax dataset index (missing {error}); "
                "prepare the dataset with `python -m unimmad_jax.data prepare`."
            ) from error
