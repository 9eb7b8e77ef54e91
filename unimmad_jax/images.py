"""Image files as uint8 arrays: the one decoder of the data pipeline and of serving.

numpy and PIL only, so that `unimmad_jax.serving` reads images as training does without the data
pipeline's dependencies (tfds, grain).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from etils import epath

PLAIN_MODES = ("RGB", "L")
"""8-bit RGB and gray: the modes every decoder reads as they are."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B")


class ImageFileError(ValueError):
    """An image file that is missing, unreadable or of a mode no model input has; the message names the file."""


def open_image(path: epath.PathLike) -> PIL.Image.Image:
    """The image at `path` (local or a cloud path such as `gs://...`), decoded (so that a corrupt file fails here)."""
    try:
        with epath.Path(path).open("rb") as file:
            image = PIL.Image.open(file)
            image.load()
    except FileNotFoundError as error:
        raise ImageFileError(f"Missing image file {path}.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageFileError(f"Corrupt or unreadable image {path}: {error}") from error
    return image


def to_plain_mode(image: PIL.Image.Image, path: epath.PathLike) -> PIL.Image.Image:
    """8-bit RGB or gray; 16-bit gray keeps its top 8 bits."""
    if image.mode in PLAIN_MODES:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        return PIL.Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ImageFileError(f"Image {path} has mode {image.mode!r} (32-bit); expected an 8- or 16-bit image.")
    return image.convert("RGB")


def read_rgb(path: epath.PathLike) -> np.ndarray:
    """An image file as uint8 ``[h, w, 3]`` (gray repeated)."""
    return np.asarray(to_plain_mode(open_image(path), path).convert("RGB"))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> ``[size, size, 3]`` with PIL's bilinear filter (antialiased when shrinking)."""
    return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.BILINEAR))
