"""Reading source files into the arrays of the example schema.

Every failure raises :class:`InvalidDataError` naming the file at fault.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import PIL.Image
import tifffile
from etils import epath

from unimmad_jax import images
from unimmad_jax.data.schema import DEPTH_TYPES, InvalidDataError

# Formats TFDS decodes correctly as they are (in `images.PLAIN_MODES`).
_PLAIN_FORMATS = ("PNG", "JPEG")


@contextlib.contextmanager
def _as_invalid_data():
    """`images.ImageFileError` raised as this package's `InvalidDataError`, with its message."""
    try:
        yield
    except images.ImageFileError as error:
        raise InvalidDataError(str(error)) from error


def encode_image(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
    """The encoded bytes TFDS stores for an image modality, and its (h, w).

    The file is decoded once to catch corrupt files. 8-bit RGB/gray PNG and JPEG
    files are stored as they are; anything else (palette, alpha, 16-bit) is
    converted to 8-bit RGB/gray and stored as PNG.
    """
    with _as_invalid_data():
        image = images.open_image(path)
        size = (image.height, image.width)
        if image.mode in images.PLAIN_MODES and image.format in _PLAIN_FORMATS:
            return path.read_bytes(), size
        buffer = io.BytesIO()
        images.to_plain_mode(image, path).save(buffer, format="PNG")
    return buffer.getvalue(), size


def read_image(path: epath.Path) -> np.ndarray:
    """An image modality file as uint8 ``[h, w, 3]`` (gray repeated)."""
    with _as_invalid_data():
        return images.read_rgb(path)


def read_mask(path: epath.Path) -> np.ndarray:
    """A ground-truth file as uint8 ``[h, w]``: 0 good, non-zero defective.

    Defect ids are kept (clipped to 1..255); a colour mask is defective where
    any colour channel is non-zero (alpha and palettes are resolved first).
    """
    with _as_invalid_data():
        image = images.open_image(path)
    if image.mode in ("P", "PA", "RGBA", "LA"):
        image = image.convert("RGB")
    mask = np.asarray(image).astype(np.int64)
    if mask.ndim == 3:
        mask = mask.max(axis=-1)
    return np.where(mask > 0, np.clip(mask, 1, 255), 0).astype(np.uint8)


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[h, w]`` mask."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def check_depth(depth: np.ndarray, modality_type: str, path: epath.Path) -> None:
    """Raises unless ``depth`` is a usable ``[h, w, 2]`` depth + foreground."""
    if depth.ndim != 3 or depth.shape[-1] != 2:
        raise InvalidDataError(f"Depth from {path} has shape {depth.shape}; expected [h, w, 2].")
    if not np.all(np.isfinite(depth)):
        raise InvalidDataError(f"Depth {path} holds NaN or infinite values.")
    if modality_type == "depth" and not np.any(depth[..., 1] > 0):
        raise InvalidDataError(f"Depth {path} has no foreground (every point is zero).")


def with_foreground(depth: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    return np.stack([depth, foreground], axis=-1).astype(np.float32)


def read_xyz_depth(path: epath.Path) -> np.ndarray:
    """An organised point cloud TIFF (float ``[h, w, 3]``) as depth + foreground.

    Depth is the z channel; the foreground is every point with a non-zero
    coordinate (MVTec 3D-AD marks missing points as (0, 0, 0)).
    """
    try:
        with epath.Path(path).open("rb") as file:
            xyz = np.asarray(tifffile.imread(file), dtype=np.float32)
    except FileNotFoundError as error:
        raise InvalidDataError(f"Missing point cloud file {path}.") from error
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise InvalidDataError(f"Corrupt or unreadable TIFF {path}: {error}") from error
    if xyz.size == 0:  # tifffile logs and returns nothing for broken files
        raise InvalidDataError(f"Corrupt or unreadable TIFF {path}: no image data.")
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise InvalidDataError(f"Point cloud {path} has shape {xyz.shape}; expected [h, w, 3] (x, y, z).")
    return with_foreground(xyz[..., 2], np.any(xyz != 0, axis=-1))


def read_npy_depth(path: epath.Path, modality_type: str) -> np.ndarray:
    """A ``.npy`` depth of the authors' release as depth + foreground.

    ``depth``: ``[h, w, C>=2]``, depth in ``[..., 0]``, foreground in
    ``[..., -1]``. ``wofg_depth``: ``[h, w]`` or ``[h, w, C]`` with depth in
    ``[..., 0]``; its foreground is all ones.
    """
    try:
        with epath.Path(path).open("rb") as file:
            array = np.load(file, allow_pickle=False).astype(np.float32)
    except FileNotFoundError as error:
        raise InvalidDataError(f"Missing depth file {path}.") from error
    except (OSError, ValueError, EOFError) as error:
        raise InvalidDataError(f"Corrupt or unreadable .npy {path}: {error}") from error
    if modality_type == "depth":
        if array.ndim != 3 or array.shape[-1] < 2:
            raise InvalidDataError(
                f"Depth {path} has shape {array.shape}; a `depth` modality needs "
                "[h, w, C>=2] with the foreground in the last channel (use "
                "`wofg_depth` for depth without foreground)."
            )
        depth = with_foreground(array[..., 0], (array[..., -1] > 0))
    else:
        plane = array if array.ndim == 2 else array[..., 0]
        depth = with_foreground(plane, np.ones_like(plane))
    return depth


def read_depth_file(path: epath.Path, modality_type: str) -> np.ndarray:
    """A checked depth file (``.tif``/``.tiff`` point cloud or ``.npy``)."""
    if modality_type not in DEPTH_TYPES:
        raise InvalidDataError(f"{modality_type!r} is not a depth type {DEPTH_TYPES}.")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        depth = read_xyz_depth(path)
        if modality_type == "wofg_depth":
            depth[..., 1] = 1.0
    elif suffix == ".npy":
        depth = read_npy_depth(path, modality_type)
    else:
        raise InvalidDataError(f"Cannot read depth from {path}: expected a .tiff point cloud or a .npy.")
    check_depth(depth, modality_type, path)
    return depth
