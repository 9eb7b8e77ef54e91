"""VisA: RGB only, split by the official split_csv/1cls.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from unimmad_jax.data.builders import base
from unimmad_jax.data.schema import InvalidDataError

_SPLIT_CSV = Path("split_csv") / "1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


class Visa(base.FolderBuilder):
    """VisA: 12 classes, one RGB modality (JPG images, PNG masks).

    ``split_csv/1cls.csv`` lists every image: ``object, split (train|test),
    label (normal|anomaly), image, mask`` with paths relative to the VisA folder.
    VisA does not name defect types, so the defect type is ``good`` or
    ``anomaly``.
    """

    name = "visa"
    HOMEPAGE = "https://github.com/amazon-science/spot-diff"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download VisA_20220922.tar (links at {HOMEPAGE}), extract it and pass the
    extracted folder (holding candle/, capsules/, ... and {_SPLIT_CSV}) as
    --manual-dir.
    """

    def _list_folder(self, root: Path):
        samples = {"train": [], "test": []}
        for row_number, row in _read_rows(root / _SPLIT_CSV):
            split, sample = _sample(root, row, f"{root / _SPLIT_CSV} row {row_number}")
            samples[split].append(sample)
        class_names = {s.class_name for split in samples.values() for s in split}
        for class_name in sorted(class_names):
            train = [s for s in samples["train"] if s.class_name == class_name]
            base.require_training_images(train, root / class_name)
        # Group each split by class, keeping the CSV order within a class.
        return {split: sorted(split_samples, key=lambda s: s.class_name) for split, split_samples in samples.items()}


def _read_rows(csv_path: Path):
    if not csv_path.is_file():
        raise base.layout_error(
            f"Missing {csv_path}: the VisA folder is not laid out as expected.",
            Visa.MANUAL_DOWNLOAD_INSTRUCTIONS,
        )
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = set(_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise InvalidDataError(f"{csv_path} lacks the columns {sorted(missing)}.")
        rows = list(reader)
    return enumerate(rows, start=2)  # row 1 is the header


def _sample(root: Path, row: dict[str, str], where: str):
    split, label_name = row["split"].strip(), row["label"].strip()
    if split not in ("train", "test") or label_name not in _LABELS:
        raise InvalidDataError(
            f"{where}: split {split!r} / label {label_name!r} not in (train|test) / {tuple(_LABELS)}."
        )
    image = root / row["image"].strip()
    if not image.is_file():
        raise InvalidDataError(f"{where}: missing image {image}.")
    label = _LABELS[label_name]
    mask = root / row["mask"].strip() if label else None
    if mask is not None and not mask.is_file():
        raise InvalidDataError(f"{where}: missing ground truth {mask}.")
    return split, base.SampleFiles(
        class_name=row["object"].strip(),
        defect_type="anomaly" if label else "good",
        label=label,
        modalities=(("rgb", image),),
        mask=mask,
        source=base.relative(image, root),
    )
