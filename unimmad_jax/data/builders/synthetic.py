"""A built-in synthetic dataset: no download, deterministic, built in seconds.

Two domains at 128 x 128:

- objects seen in RGB + depth (``tiles``, ``plate``, ``foam``): a textured
  object on a dark background; depth is the distance to the object, with the
  object's silhouette as foreground (0 outside). Defects: ``stain`` (a vivid blob, RGB
  only), ``bump`` (a raised disc, depth only), ``crack`` (a dark groove, in
  both).
- single-channel ``gray`` scans (``brain_scan``, ``lung_scan``) with bright
  ``lesion`` blobs.

Normal samples of a class differ only by a small shift, brightness and noise,
so a class's normal appearance is easy to learn; defects are large and high
contrast. Masks are exactly the defect pixels. Every sample is drawn from
``SEED`` and its (class, split, index).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import numpy as np
import PIL.Image

from unimmad_jax.data import readers
from unimmad_jax.data.builders import base

SEED = 0
SIZE = 128
TEST_GOOD = 12
TEST_ANOMALOUS = 12
_BACKGROUND_RGB = np.array([30, 30, 35], np.float32)
_CAMERA_DISTANCE = 0.5  # metres from the camera to the object's base plane


@dataclasses.dataclass(frozen=True)
class SyntheticClass:
    name: str
    domain: str  # 'object' (rgb + depth) or 'scan' (gray)
    num_train: int
    defects: tuple[str, ...]


CLASSES = (
    SyntheticClass("tiles", "object", 48, ("stain", "bump", "crack")),
    SyntheticClass("plate", "object", 40, ("stain", "bump", "crack")),
    SyntheticClass("foam", "object", 56, ("stain", "bump", "crack")),
    SyntheticClass("brain_scan", "scan", 48, ("lesion",)),
    SyntheticClass("lung_scan", "scan", 40, ("lesion",)),
)
_MODALITIES = {"object": ("rgb", "depth"), "scan": ("gray",)}


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    class_index: int
    split: str
    index: int
    defect_type: str

    @property
    def spec(self) -> SyntheticClass:
        return CLASSES[self.class_index]

    @property
    def class_name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> int:
        return int(self.defect_type != "good")

    @property
    def modality_types(self) -> tuple[str, ...]:
        return _MODALITIES[self.spec.domain]

    def rng(self) -> np.random.Generator:
        split_id = ("train", "test").index(self.split)
        return np.random.default_rng([SEED, self.class_index, split_id, self.index])


class Synthetic(base.ExampleBuilder):
    """Synthetic objects (RGB + depth) and scans (gray) with exact masks."""

    name = "synthetic"

    def _list_samples(self, dl_manager):
        del dl_manager  # nothing to download
        train, test = [], []
        for class_index, spec in enumerate(CLASSES):
            train += [SyntheticSample(class_index, "train", i, "good") for i in range(spec.num_train)]
            defects = [spec.defects[i % len(spec.defects)] for i in range(TEST_ANOMALOUS)]
            test += [
                SyntheticSample(class_index, "test", i, defect)
                for i, defect in enumerate(["good"] * TEST_GOOD + defects)
            ]
        return {"train": train, "test": test}

    def _encode(self, sample: SyntheticSample):
        images, depth, mask = render(sample)
        return {
            "modality_types": list(sample.modality_types),
            "images": [_png(image) for image in images],
            "depths": [] if depth is None else [depth],
            "mask": readers.encode_mask(mask.astype(np.uint8) * 255),
            "label": sample.label,
            "class_name": sample.class_name,
            "dataset": self.dataset_name,
            "defect_type": sample.defect_type,
            "path": f"{sample.class_name}/{sample.split}/{sample.defect_type}/{sample.index:03d}",
        }


def render(sample: SyntheticSample):
    """(uint8 images, float32 [h, w, 2] depth or None, bool defect mask).

    A sample and its twin of the same (class, split, index) but another defect
    type differ only inside the defect mask.
    """
    return _RENDERERS[sample.class_name](sample.rng(), sample.defect_type)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _grid(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates relative to a centre jittered by up to 2 pixels."""
    shift = rng.uniform(-2, 2, size=2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return yy - SIZE / 2 - shift[0], xx - SIZE / 2 - shift[1]


def _disc(yy, xx, centre, radius_y, radius_x=None):
    radius_x = radius_y if radius_x is None else radius_x
    return ((yy - centre[0]) / radius_y) ** 2 + ((xx - centre[1]) / radius_x) ** 2


def _segment(yy, xx, start, end, half_width):
    """Pixels within half_width of the segment start-end."""
    direction = np.subtract(end, start)
    t = ((yy - start[0]) * direction[0] + (xx - start[1]) * direction[1]) / (direction @ direction)
    t = np.clip(t, 0, 1)
    distance = np.hypot(yy - start[0] - t * direction[0], xx - start[1] - t * direction[1])
    return distance <= half_width


def _finisher(rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Brightness jitter and sensor noise, drawn before any defect so that a
    defective sample equals its good twin outside the defect."""
    brightness = rng.uniform(0.97, 1.03)
    noise = rng.normal(0, 2, (SIZE, SIZE, 1))

    def finish(image: np.ndarray) -> np.ndarray:
        noisy = image * brightness + (noise if image.ndim == 3 else noise[..., 0])
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    return finish


# Objects: each returns its silhouette, colour and height (metres) maps and
# the half-size of the region where defects are centred.
def _tiles(yy, xx):
    silhouette = (np.abs(yy) < 44) & (np.abs(xx) < 44)
    checker = ((np.floor(yy / 22) + np.floor(xx / 22)) % 2)[..., None]
    colour = checker * [200, 170, 120] + (1 - checker) * [120, 80, 50]
    grout = (np.mod(yy, 22) < 2) | (np.mod(xx, 22) < 2)
    colour = np.where(grout[..., None], [90, 90, 90], colour)
    height = 0.02 - 0.002 * grout
    return silhouette, colour, height, 36.0


def _plate(yy, xx):
    radius = np.hypot(yy, xx)
    silhouette = radius < 46
    shade = 150 + 40 * np.sin(radius / 3)
    colour = np.stack([shade, shade, shade * 1.05], axis=-1)
    height = 0.03 * np.clip(1 - (radius / 46) ** 2, 0, 1)
    return silhouette, colour, height, 26.0


def _foam(yy, xx):
    silhouette = (np.abs(yy) < 36) & (np.abs(xx) < 50)
    wave = np.sin(yy / 4)
    colour = np.stack([60 + 30 * wave, 140 + 30 * wave, 120 + 30 * wave], axis=-1)
    height = 0.02 + 0.002 * wave
    return silhouette, colour, height, 28.0


def _add_object_defect(rng, defect, yy, xx, colour, height, extent):
    """Paints `defect` into colour (RGB) and/or height (depth); returns its mask."""
    centre = rng.uniform(-extent, extent, size=2)
    if defect == "stain":  # RGB only
        mask = _disc(yy, xx, centre, *rng.uniform(6, 10, size=2)) <= 1
        colour[mask] = [220, 30, 30] if rng.random() < 0.5 else [30, 60, 230]
    elif defect == "bump":  # depth only: a dome on a 6 mm step, so every
        # pixel of the mask is raised by at least 6 mm
        profile = 1 - _disc(yy, xx, centre, rng.uniform(7, 11))
        mask = profile >= 0
        height += np.where(mask, 0.006 + 0.006 * profile, 0.0)
    elif defect == "crack":  # both: a dark, 1 cm deep groove
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(10, 16) * np.array([np.sin(angle), np.cos(angle)])
        mask = _segment(yy, xx, centre - half, centre + half, 2.0)
        colour[mask] = [20, 20, 20]
        height -= np.where(mask, 0.01, 0.0)
    else:
        mask = np.zeros((SIZE, SIZE), bool)
    return mask


def _object_renderer(shape: Callable) -> Callable:
    def render_object(rng, defect):
        yy, xx = _grid(rng)
        silhouette, colour, height, extent = shape(yy, xx)
        colour = np.asarray(colour, np.float32) * np.ones((SIZE, SIZE, 1), np.float32)
        height = height + rng.normal(0, 2e-4, height.shape)
        finish = _finisher(rng)
        mask = _add_object_defect(rng, defect, yy, xx, colour, height, extent)
        rgb = np.where(silhouette[..., None], colour, _BACKGROUND_RGB)
        distance = np.where(silhouette, _CAMERA_DISTANCE - height, 0.0)
        depth = readers.with_foreground(distance, silhouette)
        return [finish(rgb)], depth, mask & silhouette

    return render_object


def _scan(yy, xx, rng, defect, anatomy: Callable):
    image, lesion_region = anatomy(yy, xx)
    finish = _finisher(rng)
    mask = np.zeros((SIZE, SIZE), bool)
    if defect == "lesion":
        centre = lesion_region(rng)
        mask = _disc(yy, xx, centre, *rng.uniform(5, 9, size=2)) <= 1
        image = np.where(mask, 235.0, image)
    return [finish(image)], None, mask


def _brain(yy, xx):
    head = _disc(yy, xx, (0, 0), 50, 42)
    image = np.where(head <= 1, 110 + 15 * np.sin(xx / 5) * np.sin(yy / 5), 0.0)
    image = np.where((head <= 1) & (head > 0.82), 220.0, image)  # the skull
    return image, lambda rng: rng.uniform(-24, 24, size=2)


def _lung(yy, xx):
    body = _disc(yy, xx, (0, 0), 56, 46) <= 1
    lungs = (_disc(yy, xx, (0, -20), 32, 14) <= 1) | (_disc(yy, xx, (0, 20), 32, 14) <= 1)
    image = np.where(body, 130.0, 0.0)
    image = np.where(lungs, 40.0, image)

    def lesion_region(rng):
        side = 20 if rng.random() < 0.5 else -20
        return np.array([rng.uniform(-18, 18), side + rng.uniform(-4, 4)])

    return image, lesion_region


_RENDERERS = {
    "tiles": _object_renderer(_tiles),
    "plate": _object_renderer(_plate),
    "foam": _object_renderer(_foam),
    "brain_scan": lambda rng, defect: _scan(*_grid(rng), rng, defect, _brain),
    "lung_scan": lambda rng, defect: _scan(*_grid(rng), rng, defect, _lung),
}
