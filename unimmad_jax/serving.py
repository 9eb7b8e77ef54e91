"""Run a model exported by `unimmad_jax.export`, with jax, numpy and PIL only (no flax, no config files).

    python -m unimmad_jax.serving --model MODEL_DIR --out OUT_DIR [--class NAME] IMAGE_OR_FOLDER...

Each argument is one sample: an image file, or a multi-modal sample's files in slot order joined
by '+' (`a_rgb.png+a_ir.png`); a folder gives one single-modality sample per image in it.  The
images are of class `--class` (a calibrated class, `dataset/class` where names repeat), else of
an unknown class, which takes the first dataset's dataset-level statistics.  Images of another
size than the model's are resized as in training (PIL bilinear), and said.  Writes
OUT_DIR/scores.csv with `unimmad_jax.predict`'s columns, and with `--maps` OUT_DIR/maps.npz
(`anomaly_map`, `normalized_map`, in the rows' order).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict

import jax
import numpy as np
from etils import epath

from unimmad_jax import images, packing

FORMAT_VERSION = 2
"""Of the model folders this loader reads (`unimmad_jax.export.FORMAT_VERSION`)."""
COLUMNS = ("path", "class", "label", "image_score", "normalized_score", "decision", "threshold")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ServingError(ValueError):
    """Input the exported model cannot take; the message names the file, class or model folder."""


class Model:
    """An exported model folder: the deserialised function and its metadata."""

    def __init__(self, folder: epath.PathLike):
        folder = epath.Path(folder)
        metadata_path = folder / "metadata.json"
        try:
            self.metadata = json.loads(metadata_path.read_text())
        except FileNotFoundError as error:
            raise ServingError(f"{metadata_path} is missing: export with `python -m unimmad_jax.export`") from error
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ServingError(
                f"{metadata_path} has format_version {version}; this unimmad_jax.serving reads {FORMAT_VERSION}: "
                "export the model again with this version"
            )
        convention = self.metadata["versions"]["calling_convention"]
        lowest = jax.export.minimum_supported_calling_convention_version
        highest = jax.export.maximum_supported_calling_convention_version
        if not lowest <= convention <= highest:
            raise ServingError(
                f"{folder / 'model.jax'} was exported by jax {self.metadata['versions']['jax']} (calling convention "
                f"{convention}); this jax {jax.__version__} runs {lowest} to {highest}"
            )
        try:
            self.exported = jax.export.deserialize(bytearray((folder / "model.jax").read_bytes()))
        except FileNotFoundError as error:
            raise ServingError(f"{folder / 'model.jax'} is missing") from error
        except Exception as error:  # flatbuffers parsing fails in many ways on a foreign or damaged file
            raise ServingError(f"{folder / 'model.jax'} cannot be read by jax {jax.__version__}: {error}") from error
        self.image_size = int(self.metadata["image_size"])
        self.slots = int(self.metadata["slots"])
        self.rows = self.metadata["statistics"]

    def statistics_row(self, class_name: str) -> tuple[int, str, list[str] | None]:
        """The statistics row, class name and modality types (None: unknown class) of `class_name`."""
        if not class_name:
            dataset = self.rows[0]["dataset"]
            print(f"images of unknown class: the dataset-level calibration of {dataset}")
            return 0, "", None
        dataset, _, name = class_name.rpartition("/")
        matches = [
            (i, row)
            for i, row in enumerate(self.rows)
            if row["class"] == name and dataset in ("", row["dataset"]) and row["class"]
        ]
        if len(matches) != 1:
            known = [f"{row['dataset']}/{row['class']}" for row in self.rows if row["class"]]
            problem = "is ambiguous, give dataset/class" if matches else "is not a class of this model"
            raise ServingError(f"--class {class_name} {problem}; classes: {', '.join(known)}")
        index, row = matches[0]
        return index, name, row["modality_types"]

    def __call__(self, images: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The model on a batch's valid pairs: the batch as one group, its budget exactly its valid pairs."""
        pairs = packing.pack_pairs(mask, groups=1, budget=int(np.sum(mask)))
        pair_fields = (pairs[key] for key in packing.PAIR_KEYS)
        return jax.tree_util.tree_map(np.asarray, self.exported.call(images, mask, *pair_fields, rows))


def read_image(path: epath.Path, image_size: int, resized: dict) -> np.ndarray:
    """uint8 `[image_size, image_size, 3]` as the training data reads and resizes it (`unimmad_jax.images`);
    images of another size are noted in `resized` by their (width, height)."""
    image = images.read_rgb(path)
    height, width = image.shape[:2]
    if (height, width) != (image_size, image_size):
        resized[width, height].append(path)
    return images.resize(image, image_size)


def samples_of(arguments: list[str]) -> list[list[epath.Path]]:
    """The files of each sample: '+'-joined files, or one sample per image of a folder."""
    samples = []
    for argument in arguments:
        path = epath.Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ServingError(f"folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            samples += [[file] for file in files]
        else:
            samples.append([epath.Path(part) for part in argument.split("+")])
    return samples


def check_modalities(
    sample: list[epath.Path], class_name: str, types: list[str] | None, slots: int, image_types: list[str]
) -> None:
    """A sample must have its class's image modalities, and fit the model's slots."""
    label = "+".join(map(str, sample))
    if types is None:
        if len(sample) > slots:
            raise ServingError(f"sample {label} has {len(sample)} modalities; the model has {slots} slots")
        return
    depth = [t for t in types if t not in image_types]
    if depth:
        raise ServingError(
            f"class {class_name} takes modalities {'+'.join(types)}: the exported model reads uint8 images only, "
            f"not {'/'.join(depth)} (point clouds); use `python -m unimmad_jax.main --mode=predict` for this class"
        )
    if len(sample) != len(types):
        raise ServingError(
            f"sample {label} has {len(sample)} modalities; class {class_name} takes {len(types)} ({'+'.join(types)})"
        )


def score(model: Model, samples: list[list[epath.Path]], class_name: str, batch_size: int):
    """`scores.csv` rows and the maps of every sample, in order."""
    row_index, name, types = model.statistics_row(class_name)
    for sample in samples:
        check_modalities(sample, name, types, model.slots, model.metadata["image_modality_types"])
    size, slots = model.image_size, model.slots
    resized = defaultdict(list)
    rows, maps = [], defaultdict(list)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = np.zeros((len(chunk), slots, size, size, 3), np.uint8)
        mask = np.zeros((len(chunk), slots), bool)
        for i, sample in enumerate(chunk):
            for slot, path in enumerate(sample):
                images[i, slot] = read_image(path, size, resized)
            mask[i, : len(sample)] = True
        out = model(images, mask, np.full(len(chunk), row_index, np.int32))
        for i, sample in enumerate(chunk):
            values = (
                str(sample[0]),
                name,
                -1,
                float(out["image_score"][i]),
                float(out["normalized_score"][i]),
                int(out["decision"][i]),
                float(out["threshold"][i]),
            )
            rows.append(dict(zip(COLUMNS, values)))
        maps["anomaly_map"].append(out["anomaly_map"])
        maps["normalized_map"].append(out["normalized_map"])
    for (width, height), paths in resized.items():
        print(f"resized {len(paths)} image(s) of {width}x{height} to {size}x{size} (bilinear), e.g. {paths[0]}")
    return rows, {key: np.concatenate(values) for key, values in maps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unimmad_jax.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a folder written by `python -m unimmad_jax.export`")
    parser.add_argument("--out", required=True, help="where scores.csv goes")
    parser.add_argument("--class", dest="class_name", default="", help="the images' class; empty: unknown")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--maps", action="store_true", help="also write maps.npz")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    args = parser.parse_args(argv)
    try:
        model = Model(args.model)
        rows, maps = score(model, samples_of(args.inputs), args.class_name, args.batch_size)
    except (ServingError, images.ImageFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = epath.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scores.csv").open("w") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if args.maps:
        with (out / "maps.npz").open("wb") as file:
            np.savez(file, **maps)
    print(f"wrote {len(rows)} scores to {out / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
