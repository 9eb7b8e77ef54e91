"""Prediction: per-image scores and decisions (CSV, JSON) and heat-map overlays (PNG) for a folder or a prepared split.

`config.predict.input` is a folder (every image in it is one single-modality sample of type
`config.predict.modality_type`, of class `config.predict.class_name`, empty when unknown) or
`<dataset>:<split>` of a prepared dataset (all its modalities, and its ground truth drawn as a
contour).  Decisions and normalised scores and maps use the workdir's calibration
(`unimmad_jax.calibrate`) of the image's class, its dataset's for an unknown class;
`config.predict.threshold` / `.sensitivity` override the thresholds.  Results go to
`<workdir>/predictions/<input name>/` (local or `gs://`): `scores.csv` and `scores.json` (columns
`COLUMNS`) and `overlays/*.png` (the normalised map on the fixed scale [0, 1], the threshold's
contour, and the ground truth's when known).  A folder's image that cannot be read is listed in
`errors.csv` (columns `ERROR_COLUMNS`) and the others are scored.  Each process reads and runs its
share of every batch; process 0 gathers the results and writes them, every image once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unimmad_jax import calibrate, evaluate, packing, sharding  # noqa: E402
from unimmad_jax.config import eval_datasets  # noqa: E402
from unimmad_jax.data import InvalidDataError, eval_loader, load_modality  # noqa: E402
from unimmad_jax.data.pipeline import host_groups  # noqa: E402
from unimmad_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from unimmad_jax.data.schema import DEPTH_TYPES, MODALITY_TYPES  # noqa: E402
from unimmad_jax.models.unimmad import UniMMAD  # noqa: E402
from unimmad_jax.serving import COLUMNS, IMAGE_SUFFIXES  # noqa: E402  (serving's loader writes the same rows)

ERROR_COLUMNS = ("path", "error")


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Where a prediction's files went, and how many of its inputs could not be read."""

    out_dir: epath.Path
    failed: int


def folder_batches(
    folder: epath.Path, modality_type: str, image_size: int, num_slots: int, batch_size: int, groups: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches of the images in `folder`, each a one-modality sample.

    Global batch k holds files [k * G, (k + 1) * G), G = batch_size * process count, and process p
    reads its p-th block of batch_size rows; rows past the last file are padding (`valid` False).
    A file that cannot be read is a row with `valid` False and its message in `error`.  With
    `groups` (the devices along the data axis), batches carry their pairs (`packing.pack_pairs`):
    one per readable image, at a budget of a group's rows; None: no pair fields.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidDataError(f"config.predict.input={folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    if modality_type not in MODALITY_TYPES:
        raise InvalidDataError(f"config.predict.modality_type={modality_type!r} is not one of {MODALITY_TYPES}")
    global_batch_size = batch_size * jax.process_count()
    local_groups = None if groups is None else host_groups(groups, batch_size, jax.process_count())
    for start in range(0, len(files), global_batch_size):
        first = start + jax.process_index() * batch_size
        chunk = files[first : first + batch_size]
        images = np.zeros((batch_size, num_slots, image_size, image_size, 3), np.float32)
        errors = [""] * batch_size
        for row, path in enumerate(chunk):
            try:
                images[row, 0] = load_modality(path, modality_type, image_size)
            except InvalidDataError as error:
                errors[row] = str(error)
        valid = (np.arange(batch_size) < len(chunk)) & (np.asarray(errors) == "")
        modality_mask = (np.arange(num_slots) == 0)[None] & valid[:, None]
        pairs = (
            {} if local_groups is None else packing.pack_pairs(modality_mask, local_groups, batch_size // local_groups)
        )
        yield {
            **pairs,
            "specific_images": images,
            "modality_mask": modality_mask,
            "valid": valid,
            "path": np.array([str(p) for p in chunk] + [""] * (batch_size - len(chunk))),
            "error": np.asarray(errors),
            "label": np.full(batch_size, -1, np.int32),
            "class_name": np.full(batch_size, ""),
            "modality_types": np.full(batch_size, modality_type),
            "gt_mask": None,
        }


def displayable(slot: np.ndarray, modality_type: str) -> np.ndarray:
    """A preprocessed slot `[H, W, 3]` back to an image in [0, 1]."""
    if modality_type in DEPTH_TYPES:
        plane = slot[..., 0]
        return np.repeat(((plane - plane.min()) / max(np.ptp(plane), 1e-6))[..., None], 3, axis=-1)
    return np.clip(slot * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def save_overlay(
    path: epath.Path, image: np.ndarray, normalized_map: np.ndarray, row: dict, gt_mask: np.ndarray | None
) -> None:
    """The input beside its normalised map on [0, 1] with the threshold (0.5) and ground-truth contours."""
    figure, axes = plt.subplots(1, 2, figsize=(7.2, 3.4))
    axes[0].imshow(image)
    axes[0].set_title(f"{row['class'] or 'unknown class'}" + ("" if row["label"] < 0 else f", label {row['label']}"))
    axes[1].imshow(image)
    heat = axes[1].imshow(normalized_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    if normalized_map.max() >= 0.5:
        axes[1].contour(normalized_map, levels=[0.5], colors="white", linewidths=1.0)
    if gt_mask is not None and gt_mask.any():
        axes[1].contour(gt_mask, levels=[0.5], colors="lime", linewidths=1.0, linestyles="dashed")
    verdict = "anomalous" if row["decision"] else "good"
    axes[1].set_title(f"{verdict}: {row['normalized_score']:.2f} (score {row['image_score']:.4f})")
    figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02, ticks=[0.0, 0.5, 1.0])
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    with path.open("wb") as file:
        figure.savefig(file, format="png", dpi=100)
    plt.close(figure)


def _gathered_rows(batch: dict, out: dict, with_overlays: bool) -> dict[str, np.ndarray]:
    """All processes' rows of a batch, on every process; the overlay inputs only `with_overlays`."""
    columns = sharding.gather({"image_score": out["image_score"], "label": batch["label"], "valid": batch["valid"]})
    for key in ("path", "class_name", "error"):
        if key in batch:
            columns[key] = sharding.gather_text(batch[key])
    if with_overlays:
        columns.update(sharding.gather({"anomaly_map": out["anomaly_map"], "image": batch["specific_images"][:, 0]}))
        columns["modality_type"] = sharding.gather_text([types.split(",")[0] for types in batch["modality_types"]])
        if batch["gt_mask"] is not None:
            columns["gt_mask"] = sharding.gather(batch["gt_mask"])
    return columns


def predict(
    model: UniMMAD, variables: dict, config: ml_collections.ConfigDict, workdir: epath.PathLike, step: int | None
) -> Predictions:
    """Score every image of `config.predict.input` with `variables` (checkpoint step `step`, whose calibration
    it uses; None: not a checkpoint's).

    Raises `InvalidDataError` when none of a folder's images can be read (after writing `errors.csv`).
    """
    source = config.predict.input
    if not source:
        raise ValueError("config.predict.input is empty: give a folder of images or <dataset>:<split>")
    mesh = sharding.data_mesh()
    batch_size = sharding.per_host_batch_size(config.predict.batch_size, mesh, "config.predict.batch_size")
    folder = epath.Path(source)
    groups = mesh.shape[sharding.DATA_AXIS]
    if folder.is_dir():
        batches = folder_batches(
            folder,
            config.predict.modality_type,
            config.image_size,
            config.data.num_slots,
            batch_size,
            groups if config.data.pack_pairs else None,
        )
        name = folder.name
    else:
        dataset, _, split = source.partition(":")
        if not split:
            raise InvalidDataError(f"config.predict.input={source!r} is neither a folder nor <dataset>:<split>")
        batches = eval_loader(config.data, dataset, split, batch_size=batch_size, groups=groups, shard_by_host=True)
        name = f"{dataset.replace('/', '_')}_{split}"
    out_dir = epath.Path(workdir) / "predictions" / name
    main_process = sharding.is_main_process()
    statistics = _statistics_lookup(config, workdir, step, None if folder.is_dir() else dataset)

    score_fn = evaluate.make_score_fn(model, mesh)
    rows, overlays, errors = [], [], []
    for batch in tqdm(batches, desc=f"predict {name}", disable=not (main_process and config.predict.max_overlays)):
        inputs = sharding.to_global(batch, mesh, sharding.MODEL_KEYS)
        out = score_fn(variables, inputs["specific_images"], inputs["modality_mask"], packing.batch_pairs(inputs))
        # Every process holds the same rows, so all agree on whether to gather the overlay inputs.
        columns = _gathered_rows(batch, out, with_overlays=len(overlays) < config.predict.max_overlays)
        if "error" in columns:
            unread = np.flatnonzero(columns["error"] != "")
            errors += [{"path": str(columns["path"][row]), "error": str(columns["error"][row])} for row in unread]
        for row in np.flatnonzero(columns["valid"]):
            class_name = str(columns["class_name"][row]) or config.predict.class_name
            stats = statistics(class_name)
            score = columns["image_score"][row]
            record = {
                "path": str(columns["path"][row]),
                "class": class_name,
                "label": int(columns["label"][row]),
                "image_score": float(score),
                "normalized_score": float(calibrate.normalize(score, *dataclasses.astuple(stats))),
                "decision": int(score >= np.float32(stats.threshold)),
                "threshold": stats.threshold,
            }
            rows.append(record)
            if len(overlays) < config.predict.max_overlays:
                gt = columns["gt_mask"][row] if "gt_mask" in columns else None
                image = displayable(columns["image"][row], str(columns["modality_type"][row]))
                normalized_map = np.asarray(
                    calibrate.normalize(columns["anomaly_map"][row], *dataclasses.astuple(stats))
                )
                overlays.append((image, normalized_map, gt))
    if main_process:
        _write(out_dir, rows, overlays, errors)
    if errors and not rows:
        raise InvalidDataError(
            f"none of the {len(errors)} images of config.predict.input={source} could be read "
            f"(each one's error: {out_dir / 'errors.csv'}); the first: {errors[0]['error']}"
        )
    return Predictions(out_dir=out_dir, failed=len(errors))


def _write(out_dir: epath.Path, rows: list[dict], overlays: list[tuple], errors: list[dict]) -> None:
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for name, columns, records in (("scores.csv", COLUMNS, rows), ("errors.csv", ERROR_COLUMNS, errors)):
        with (out_dir / name).open("w") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
    (out_dir / "scores.json").write_text(json.dumps(rows, indent=1))
    for index, (image, normalized_map, gt) in enumerate(overlays):
        name = epath.Path(rows[index]["path"]).with_suffix("").as_posix().strip("/").replace("/", "_")
        save_overlay(out_dir / "overlays" / f"{index:04d}_{name}.png", image, normalized_map, rows[index], gt)
    print(
        f"wrote {len(rows)} scores to {out_dir / 'scores.csv'} and {len(overlays)} overlays to {out_dir / 'overlays'}"
    )
    if errors:
        print(f"{len(errors)} images could not be read, each listed with its error in {out_dir / 'errors.csv'}")


def _statistics_lookup(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, step: int | None, dataset: str | None
):
    """`class name -> calibrate.Statistics` (overrides applied) of checkpoint step `step` for the images of
    `dataset` (None: a folder's).

    A folder's images belong to the dataset calibrated with `config.predict.class_name`; an unknown
    class takes the dataset-level statistics of the first evaluation dataset, and says so.
    """
    record = calibrate.load(workdir, step)
    if dataset is None:
        wanted = config.predict.class_name
        holding = [name for name, entry in record["datasets"].items() if wanted in entry["classes"]]
        if wanted and not holding:
            known = sorted({c for entry in record["datasets"].values() for c in entry["classes"]})
            raise InvalidDataError(f"config.predict.class_name={wanted!r} is not a calibrated class; known: {known}")
        dataset = holding[0] if holding else eval_datasets(config)[0]
    cache = {}

    def lookup(class_name: str) -> calibrate.Statistics:
        if class_name not in cache:
            stats, source = calibrate.statistics_for(record, dataset, class_name)
            cache[class_name] = calibrate.override(stats, config.predict.threshold, config.predict.sensitivity)
            threshold = cache[class_name].threshold
            if sharding.is_main_process():
                print(f"images of {class_name or 'unknown class'}: threshold {threshold:.6g} from {source}")
        return cache[class_name]

    return lookup
