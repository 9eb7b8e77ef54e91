"""Per-modality preprocessing (docs/data.md#preprocessing): decoded arrays -> model inputs.

- ``rgb``, ``gray``, ``infrared`` (all read as 8-bit RGB): PIL bilinear resize
  of the uint8 image (PIL's bilinear widens its support when shrinking, i.e.
  it antialiases, as torchvision's PIL ``Resize`` did for the reference), scale
  to [0, 1], normalise with the ImageNet mean and std.
- ``depth``: ``m = sum(fg * d) / sum(fg)``; ``d = fg * d + (1 - fg) * m``;
  ``d = (d - m) * 100``; bilinear resize with half-pixel centres and no
  antialiasing (``torch.nn.functional.interpolate(align_corners=False)``);
  repeated to 3 channels; no ImageNet normalisation.
- ``wofg_depth``: the same with ``m = mean(d)`` over all pixels.
- ground-truth masks: bilinear resize (PIL, on float32) then ``> 0``.

The output of every modality is float32 ``[H, W, 3]`` with ``H = W =
image_size``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from etils import epath

from unimmad_jax import images
from unimmad_jax.data import readers
from unimmad_jax.data.schema import IMAGE_TYPES, MODALITY_TYPES, InvalidDataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
DEPTH_SCALE = 100.0


def preprocess_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> ImageNet-normalised float32 ``[H, W, 3]``."""
    scaled = images.resize(image, image_size).astype(np.float32) / 255.0
    return (scaled - IMAGENET_MEAN) / IMAGENET_STD


def _source_indices(in_size: int, out_size: int):
    """Half-pixel bilinear taps along one axis: (low, high, high weight)."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    low = np.minimum(low, in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def resize_bilinear(array: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize of a float ``[h, w]`` array, half-pixel centres.

    No antialiasing: the same taps as PyTorch's ``interpolate(mode='bilinear',
    align_corners=False)``.
    """
    rows_low, rows_high, row_weight = _source_indices(array.shape[0], image_size)
    cols_low, cols_high, col_weight = _source_indices(array.shape[1], image_size)
    rows = array[rows_low] * (1 - row_weight)[:, None] + array[rows_high] * row_weight[:, None]
    return rows[:, cols_low] * (1 - col_weight) + rows[:, cols_high] * col_weight


def normalise_depth(depth: np.ndarray, modality_type: str) -> np.ndarray:
    """``[h, w, 2]`` depth + foreground -> the centred, scaled ``[h, w]`` depth."""
    values = depth[..., 0].astype(np.float64)
    if modality_type == "wofg_depth":
        mean = values.mean()
        filled = values
    else:
        foreground = depth[..., -1].astype(np.float64)
        count = foreground.sum()
        if count <= 0:
            raise InvalidDataError("depth has no foreground")
        mean = (foreground * values).sum() / count
        filled = foreground * values + (1 - foreground) * mean
    return ((filled - mean) * DEPTH_SCALE).astype(np.float32)


def preprocess_depth(depth: np.ndarray, modality_type: str, image_size: int) -> np.ndarray:
    """float32 ``[h, w, 2]`` depth + foreground -> float32 ``[H, W, 3]``."""
    plane = resize_bilinear(normalise_depth(depth, modality_type), image_size)
    return np.repeat(plane[..., None], 3, axis=-1).astype(np.float32)


def preprocess_modality(array: np.ndarray, modality_type: str, image_size: int) -> np.ndarray:
    """One decoded modality (uint8 image or depth + fg) -> ``[H, W, 3]``."""
    if modality_type in IMAGE_TYPES:
        return preprocess_image(array, image_size)
    return preprocess_depth(array, modality_type, image_size)


def preprocess_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 ``[h, w]`` or ``[h, w, 1]`` mask -> float32 ``[H, W]`` in {0, 1}."""
    plane = np.asarray(mask, np.float32).reshape(mask.shape[0], mask.shape[1])
    resized = PIL.Image.fromarray(plane, mode="F").resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
    return (np.asarray(resized) > 0).astype(np.float32)


def load_modality(path: epath.PathLike, modality_type: str, image_size: int) -> np.ndarray:
    """Reads and preprocesses one modality file as the batches do.

    Args:
      path: an image (``rgb``/``gray``/``infrared``), a point cloud ``.tiff``
        (depth = z, foreground = non-zero points) or a ``.npy`` depth
        (``[h, w, C>=2]`` with the foreground last for ``depth``).
      modality_type: one of ``schema.MODALITY_TYPES``.
      image_size: output height and width.

    Returns:
      float32 ``[image_size, image_size, 3]``, the content of one slot of
      ``specific_images``.
    """
    path = epath.Path(path)
    if modality_type not in MODALITY_TYPES:
        raise InvalidDataError(f"Unknown modality type {modality_type!r} for {path}; expected one of {MODALITY_TYPES}.")
    if modality_type in IMAGE_TYPES:
        return preprocess_image(readers.read_image(path), image_size)
    return preprocess_depth(readers.read_depth_file(path, modality_type), modality_type, image_size)
