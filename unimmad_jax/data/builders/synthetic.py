"""The built-in synthetic datasets: no download, deterministic, built in seconds.

Two domains at 128 x 128:

- objects seen in RGB + depth (``tiles``, ``plate``, ``foam``): a textured
  object on a dark background; depth is the distance to the object, with the
  object's silhouette as foreground (0 outside). Defects: ``stain`` (RGB
  only), ``bump`` (depth only), ``crack`` (in both).
- single-channel ``gray`` scans (``brain_scan``, ``lung_scan``) with
  ``lesion`` blobs.

Two variants share the classes, the splits and the renderers and differ by
their `Difficulty`:

- ``synthetic``: normal samples of a class differ only by a small shift,
  brightness and noise; defects are large and vivid (a red or blue stain, a
  6-12 mm bump, a black 1 cm groove, a white lesion). The demo model finds all
  of them.
- ``synthetic_hard``: normal samples are also shifted further, rotated (up
  to 3 degrees), scaled (3 %), tinted (2 % per channel) and tilted (depth),
  their texture is shifted against the object and their noise is stronger;
  defects are smaller, fainter and mottled (a rust or ink discolouration, a
  2-6 mm dome on a 5 mm step, a thin kinked crack 4-9 mm deep, a lesion 55-150
  grey levels brighter than its tissue). The demo model misses some of them;
  at its 64 pixels and with its random prior, much fainter or smaller defects
  go unseen altogether.

In both, a defective sample equals its good twin of the same (class, split,
index) outside the defect mask, and the mask is exactly the changed pixels.
Every sample is drawn from ``SEED`` and its (class, split, index).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from pathlib import Path

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
class Difficulty:
    """How much the normal samples of a class vary, and how its defects are painted.

    A variation of 0 draws nothing from the sample's generator, so that the
    variations `synthetic` lacks leave its samples as they were.
    """

    max_shift: float  # pixels, of the object's centre
    max_rotation: float  # radians
    max_scale: float  # relative change of the object's size
    max_phase: float  # pixels, of the texture against the object
    brightness: float  # relative change of the whole image
    max_tint: float  # relative change of each colour channel
    noise: float  # std of the sensor noise, grey levels
    height_noise: float  # std of the surface roughness, metres
    max_tilt: float  # metres per pixel, of the object's surface
    paint_object_defect: Callable  # (rng, defect, yy, xx, colour, height, extent) -> mask
    paint_lesion: Callable  # (rng, yy, xx, image, centre) -> (image, mask)


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    class_index: int
    split: str
    index: int
    defect_type: str
    difficulty: Difficulty

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


def render(sample: SyntheticSample):
    """(uint8 images, float32 [h, w, 2] depth or None, bool defect mask).

    A sample and its twin of the same (class, split, index) but another defect
    type differ only inside the defect mask.
    """
    return _RENDERERS[sample.class_name](sample.rng(), sample.defect_type, sample.difficulty)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _jitter(rng: np.random.Generator, amplitude: float, size: int | None = None):
    """Uniform in [-amplitude, amplitude]; 0 without drawing when amplitude is 0."""
    if amplitude == 0:
        return np.zeros(size) if size else 0.0
    return rng.uniform(-amplitude, amplitude, size=size)


def _grid(rng: np.random.Generator, difficulty: Difficulty) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in the frame of the object: shifted, rotated and scaled."""
    shift = rng.uniform(-difficulty.max_shift, difficulty.max_shift, size=2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    yy, xx = yy - SIZE / 2 - shift[0], xx - SIZE / 2 - shift[1]
    angle = _jitter(rng, difficulty.max_rotation)
    scale = 1 + _jitter(rng, difficulty.max_scale)
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * yy + sin * xx) / scale, (cos * xx - sin * yy) / scale


def _disc(yy, xx, centre, radius_y, radius_x=None):
    radius_x = radius_y if radius_x is None else radius_x
    return ((yy - centre[0]) / radius_y) ** 2 + ((xx - centre[1]) / radius_x) ** 2


def _blob(rng, yy, xx, centre, radius_y, radius_x):
    """Like `_disc`, with a wavy outline: <= 1 inside an irregular ellipse."""
    angle = np.arctan2(yy - centre[0], xx - centre[1])
    phases = rng.uniform(0, 2 * np.pi, size=2)
    outline = 1 + 0.2 * np.sin(2 * angle + phases[0]) + 0.15 * np.sin(3 * angle + phases[1])
    return _disc(yy, xx, centre, radius_y, radius_x) / outline**2


def _mottle(rng, yy, xx):
    """A smooth texture in [0, 1] with a random scale and phase, to modulate a faint defect."""
    frequencies = rng.uniform(0.5, 1.2, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    return 0.5 + 0.5 * np.sin(frequencies[0] * yy + phases[0]) * np.sin(frequencies[1] * xx + phases[1])


def _segment(yy, xx, start, end, half_width):
    """Pixels within half_width of the segment start-end."""
    direction = np.subtract(end, start)
    t = ((yy - start[0]) * direction[0] + (xx - start[1]) * direction[1]) / (direction @ direction)
    t = np.clip(t, 0, 1)
    distance = np.hypot(yy - start[0] - t * direction[0], xx - start[1] - t * direction[1])
    return distance <= half_width


def _finisher(rng: np.random.Generator, difficulty: Difficulty) -> Callable[[np.ndarray], np.ndarray]:
    """Brightness, tint and sensor noise, drawn before any defect so that a
    defective sample equals its good twin outside the defect."""
    brightness = rng.uniform(1 - difficulty.brightness, 1 + difficulty.brightness)
    noise = rng.normal(0, difficulty.noise, (SIZE, SIZE, 1))
    tint = 1 + _jitter(rng, difficulty.max_tint, 3)

    def finish(image: np.ndarray) -> np.ndarray:
        if image.ndim == 3:
            noisy = image * brightness * tint + noise
        else:
            noisy = image * brightness + noise[..., 0]
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    return finish


# Objects: each returns its silhouette, colour and height (metres) maps and
# the half-size of the region where defects are centred; `phase` shifts the
# texture (pixels, [y, x]) against the silhouette.
def _tiles(yy, xx, phase):
    silhouette = (np.abs(yy) < 44) & (np.abs(xx) < 44)
    ty, tx = yy + phase[0], xx + phase[1]
    checker = ((np.floor(ty / 22) + np.floor(tx / 22)) % 2)[..., None]
    colour = checker * [200, 170, 120] + (1 - checker) * [120, 80, 50]
    grout = (np.mod(ty, 22) < 2) | (np.mod(tx, 22) < 2)
    colour = np.where(grout[..., None], [90, 90, 90], colour)
    height = 0.02 - 0.002 * grout
    return silhouette, colour, height, 36.0


def _plate(yy, xx, phase):
    radius = np.hypot(yy, xx)
    silhouette = radius < 46
    shade = 150 + 40 * np.sin((radius + phase[0]) / 3)
    colour = np.stack([shade, shade, shade * 1.05], axis=-1)
    height = 0.03 * np.clip(1 - (radius / 46) ** 2, 0, 1)
    return silhouette, colour, height, 26.0


def _foam(yy, xx, phase):
    silhouette = (np.abs(yy) < 36) & (np.abs(xx) < 50)
    wave = np.sin((yy + phase[0]) / 4)
    colour = np.stack([60 + 30 * wave, 140 + 30 * wave, 120 + 30 * wave], axis=-1)
    height = 0.02 + 0.002 * wave
    return silhouette, colour, height, 28.0


def _paint_vivid_object_defect(rng, defect, yy, xx, colour, height, extent):
    """Paints a large, vivid `defect` into colour (RGB) and/or height (depth); returns its mask."""
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


def _paint_faint_object_defect(rng, defect, yy, xx, colour, height, extent):
    """Paints a smaller, fainter, mottled `defect`; returns its mask.

    Every masked pixel still changes by several grey levels (or millimetres),
    so that the mask is exactly the change.
    """
    centre = rng.uniform(-extent, extent, size=2)
    if defect == "stain":  # RGB only: a rust or ink discolouration, 25-90 % of the way to its colour
        mask = _blob(rng, yy, xx, centre, *rng.uniform(5, 8.5, size=2)) <= 1
        tint = np.array([150, 70, 30] if rng.random() < 0.5 else [40, 60, 160], np.float32)
        opacity = rng.uniform(0.5, 0.9) * (0.5 + 0.5 * _mottle(rng, yy, xx))[..., None]
        colour += np.where(mask[..., None], opacity * (tint - colour), 0.0)
    elif defect == "bump":  # depth only: a 2-6 mm dome on a 5 mm step
        profile = 1 - _disc(yy, xx, centre, *rng.uniform(6, 9.5, size=2))
        mask = profile >= 0
        height += np.where(mask, 0.005 + rng.uniform(0.002, 0.006) * profile, 0.0)
    elif defect == "crack":  # both: a thin kinked crack, 55-85 % darker, 4-9 mm deep
        angles = rng.uniform(0, np.pi) + rng.uniform(-0.6, 0.6, size=2)
        lengths = rng.uniform(8, 14, size=2)
        half_width = rng.uniform(1.25, 1.75)
        ends = [
            centre + sign * length * np.array([np.sin(a), np.cos(a)])
            for sign, a, length in zip((1, -1), angles, lengths)
        ]
        mask = _segment(yy, xx, centre, ends[0], half_width) | _segment(yy, xx, centre, ends[1], half_width)
        colour *= np.where(mask[..., None], 1 - rng.uniform(0.55, 0.85), 1.0)
        height -= np.where(mask, rng.uniform(0.004, 0.009), 0.0)
    else:
        mask = np.zeros((SIZE, SIZE), bool)
    return mask


def _object_renderer(shape: Callable) -> Callable:
    def render_object(rng, defect, difficulty):
        yy, xx = _grid(rng, difficulty)
        silhouette, colour, height, extent = shape(yy, xx, _jitter(rng, difficulty.max_phase, 2))
        colour = np.asarray(colour, np.float32) * np.ones((SIZE, SIZE, 1), np.float32)
        height = height + rng.normal(0, difficulty.height_noise, height.shape)
        height = height + yy * _jitter(rng, difficulty.max_tilt) + xx * _jitter(rng, difficulty.max_tilt)
        finish = _finisher(rng, difficulty)
        mask = difficulty.paint_object_defect(rng, defect, yy, xx, colour, height, extent)
        rgb = np.where(silhouette[..., None], colour, _BACKGROUND_RGB)
        distance = np.where(silhouette, _CAMERA_DISTANCE - height, 0.0)
        depth = readers.with_foreground(distance, silhouette)
        return [finish(rgb)], depth, mask & silhouette

    return render_object


def _paint_vivid_lesion(rng, yy, xx, image, centre):
    mask = _disc(yy, xx, centre, *rng.uniform(5, 9, size=2)) <= 1
    return np.where(mask, 235.0, image), mask


def _paint_faint_lesion(rng, yy, xx, image, centre):
    """A mottled blob with a wavy outline, 55-150 grey levels brighter than its tissue."""
    mask = _blob(rng, yy, xx, centre, *rng.uniform(4.5, 7.5, size=2)) <= 1
    brightening = rng.uniform(80, 150) * (0.7 + 0.3 * _mottle(rng, yy, xx))
    return np.where(mask, image + brightening, image), mask


def _scan(rng, defect, difficulty, anatomy: Callable):
    yy, xx = _grid(rng, difficulty)
    image, lesion_region = anatomy(yy, xx, _jitter(rng, difficulty.max_phase, 2))
    finish = _finisher(rng, difficulty)
    mask = np.zeros((SIZE, SIZE), bool)
    if defect == "lesion":
        image, mask = difficulty.paint_lesion(rng, yy, xx, image, lesion_region(rng))
    return [finish(image)], None, mask


def _brain(yy, xx, phase):
    head = _disc(yy, xx, (0, 0), 50, 42)
    folds = 15 * np.sin((xx + phase[1]) / 5) * np.sin((yy + phase[0]) / 5)
    image = np.where(head <= 1, 110 + folds, 0.0)
    image = np.where((head <= 1) & (head > 0.82), 220.0, image)  # the skull
    return image, lambda rng: rng.uniform(-24, 24, size=2)


def _lung(yy, xx, phase):
    body = _disc(yy, xx, (0, 0), 56, 46) <= 1
    # the lungs' gap varies with the phase
    lungs = (_disc(yy, xx, (0, -20 - phase[1] / 2), 32, 14) <= 1) | (_disc(yy, xx, (0, 20 + phase[1] / 2), 32, 14) <= 1)
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
    "brain_scan": lambda rng, defect, difficulty: _scan(rng, defect, difficulty, _brain),
    "lung_scan": lambda rng, defect, difficulty: _scan(rng, defect, difficulty, _lung),
}

EASY = Difficulty(
    max_shift=2.0,
    max_rotation=0.0,
    max_scale=0.0,
    max_phase=0.0,
    brightness=0.03,
    max_tint=0.0,
    noise=2.0,
    height_noise=2e-4,
    max_tilt=0.0,
    paint_object_defect=_paint_vivid_object_defect,
    paint_lesion=_paint_vivid_lesion,
)
HARD = Difficulty(
    max_shift=3.0,
    max_rotation=np.deg2rad(3),
    max_scale=0.03,
    max_phase=1.5,
    brightness=0.045,
    max_tint=0.02,
    noise=2.5,
    height_noise=2.5e-4,
    max_tilt=1e-5,
    paint_object_defect=_paint_faint_object_defect,
    paint_lesion=_paint_faint_lesion,
)


class Synthetic(base.ExampleBuilder):
    """Synthetic objects (RGB + depth) and scans (gray) with large, vivid defects and exact masks."""

    name = "synthetic"
    difficulty = EASY
    TRAIN_CLASSES = {spec.name: base.TrainClass(len(_MODALITIES[spec.domain]), spec.num_train) for spec in CLASSES}
    TRAIN_CLASSES_SOURCE = "the renderer's classes"

    def _list_samples(self, dl_manager):
        del dl_manager  # nothing to download
        train, test = [], []
        for class_index, spec in enumerate(CLASSES):
            train += [SyntheticSample(class_index, "train", i, "good", self.difficulty) for i in range(spec.num_train)]
            defects = [spec.defects[i % len(spec.defects)] for i in range(TEST_ANOMALOUS)]
            test += [
                SyntheticSample(class_index, "test", i, defect, self.difficulty)
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


class SyntheticHard(Synthetic):
    """The synthetic classes with more varied normal samples and smaller, fainter, mottled defects."""

    name = "synthetic_hard"
    difficulty = HARD


def write_folder(
    root: Path,
    class_names: Sequence[str] = ("tiles", "plate"),
    num_train: int = 8,
    num_validation: int = 2,
    num_test: int = 4,
    difficulty: Difficulty = EASY,
) -> Path:
    """Synthetic samples written in the layout of a `folder` dataset (`builders.folder`), to try it out.

    Each class gets `num_train` good training samples and, in validation and test, that many good
    samples and as many anomalous ones (the class's defects in turn): images as PNG (rgb or gray),
    depth as a 16-bit PNG in millimetres (0 off the object), masks as PNG. Validation samples are
    drawn after the test samples, so the two splits share none.
    """
    counts = {"train": (num_train, 0), "validation": (num_validation, num_validation), "test": (num_test, num_test)}
    first_index = {"train": 0, "validation": 2 * num_test, "test": 0}
    for class_name in class_names:
        class_index = [spec.name for spec in CLASSES].index(class_name)
        spec = CLASSES[class_index]
        for split, (good, anomalous) in counts.items():
            defects = ["good"] * good + [spec.defects[i % len(spec.defects)] for i in range(anomalous)]
            for offset, defect in enumerate(defects):
                index = first_index[split] + offset
                sample = SyntheticSample(
                    class_index, "train" if split == "train" else "test", index, defect, difficulty
                )
                images, depth, mask = render(sample)
                folder = root / class_name / split / defect
                stem = f"{index:03d}.png"
                _save(folder / sample.modality_types[0] / stem, images[0])
                if depth is not None:
                    millimetres = np.round(depth[..., 0] * 1000.0) * depth[..., 1]
                    _save(folder / "depth" / stem, millimetres.astype(np.uint16))
                if defect != "good":
                    _save(folder / "mask" / stem, mask.astype(np.uint8) * 255)
    return root


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)
