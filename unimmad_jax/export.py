"""Export a trained, calibrated workdir's whole inference path with `jax.export`, for `unimmad_jax.serving`.

    python -m unimmad_jax.export --workdir DIR --out MODEL_DIR

`MODEL_DIR/model.jax` is the serialised function, for a batch of any size `b` and any count `p`
of pairs (both symbolic) on cpu, cuda and tpu:

    (images uint8 [b, S, H, W, 3], modality_mask bool [b, S], pair_sample int32 [1, p],
     pair_slot int32 [1, p], pair_valid bool [1, p], statistics_row int32 [b]) ->
    {anomaly_map, normalized_map: float32 [b, H, W]; image_score, normalized_score, threshold:
     float32 [b]; decision: bool [b]}

It scales the images to [0, 1] and normalises them with the ImageNet statistics (the image
modality types' preprocessing; H = W = the model's image size, images of other sizes resized
by the loader as in training), runs the model on the pairs (`packing.pack_pairs(modality_mask, 1,
budget)`: the batch as one group, any budget at least its valid pairs), the anomaly map, its blur and the image score,
and normalises and decides with row `statistics_row` of the calibration's statistics.  Depth
modalities are preprocessed from float point clouds at their own resolution, which this
uint8-image signature cannot carry: classes with a depth modality are served by
`python -m unimmad_jax.main --mode=predict` only.

`MODEL_DIR/metadata.json` holds the image size, modality slots, the image modality types, each
class's modality types and statistics row, the statistics (threshold, minimum, maximum), the
versions it was made with, and the training config.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from unimmad_jax import calibrate, checkpoints, evaluate, packing, weights
from unimmad_jax.config import model_config
from unimmad_jax.data import InvalidDataError
from unimmad_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from unimmad_jax.data.schema import IMAGE_TYPES
from unimmad_jax.models.unimmad import UniMMAD

FORMAT_VERSION = 2
"""Of MODEL_DIR's files; `unimmad_jax.serving` refuses any other."""
MODEL_FILE = "model.jax"
METADATA_FILE = "metadata.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def statistics_rows(record: dict) -> list[dict]:
    """One row per dataset (its dataset-level statistics, `class` empty) and per calibrated class."""
    rows = []
    for dataset, entry in record["datasets"].items():
        rows.append({"dataset": dataset, "class": "", **entry["dataset"]})
        for name, stats in entry["classes"].items():
            rows.append({"dataset": dataset, "class": name, **stats})
    return rows


def inference_fn(model: UniMMAD, variables: dict, rows: list[dict]):
    """The exported computation, the variables and statistics table closed over as constants."""
    table = jnp.asarray([[r["threshold"], r["minimum"], r["maximum"]] for r in rows], jnp.float32)

    def serve(
        images: jax.Array,
        modality_mask: jax.Array,
        pair_sample: jax.Array,
        pair_slot: jax.Array,
        pair_valid: jax.Array,
        statistics_row: jax.Array,
    ) -> dict[str, jax.Array]:
        scaled = images.astype(jnp.float32) / 255.0
        inputs = jnp.where(modality_mask[..., None, None, None], (scaled - IMAGENET_MEAN) / IMAGENET_STD, 0.0)
        pairs = packing.PairIndex(pair_sample, pair_slot, pair_valid)
        out = evaluate.score_step(model, variables, inputs, modality_mask, pairs)
        score, maps = out["image_score"], out["anomaly_map"]
        threshold, minimum, maximum = table[statistics_row].T
        per_map = [v[:, None, None] for v in (threshold, minimum, maximum)]
        return {
            "anomaly_map": maps,
            "image_score": score,
            "normalized_map": calibrate.normalize(maps, *per_map),
            "normalized_score": calibrate.normalize(score, threshold, minimum, maximum),
            "decision": score >= threshold,
            "threshold": threshold,
        }

    return serve


def export_workdir(workdir: epath.PathLike, out: epath.PathLike, platforms=PLATFORMS) -> epath.Path:
    """Write `model.jax` and `metadata.json` of the latest checkpoint of `workdir` and its calibration to `out`."""
    latest = weights.recorded_checkpoint(workdir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.workdir_path(workdir) / 'checkpoints'}: train first")
    step, meta, variables = latest
    record = calibrate.load(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    model = UniMMAD(model_config(config))
    rows = statistics_rows(record)
    size, slots = config.image_size, config.data.num_slots
    batch, pairs = jax.export.symbolic_shape("b, p")
    exported = jax.export.export(jax.jit(inference_fn(model, variables, rows)), platforms=list(platforms))(
        jax.ShapeDtypeStruct((batch, slots, size, size, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch, slots), jnp.bool_),
        jax.ShapeDtypeStruct((1, pairs), jnp.int32),
        jax.ShapeDtypeStruct((1, pairs), jnp.int32),
        jax.ShapeDtypeStruct((1, pairs), jnp.bool_),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(exported.serialize())
    metadata = {
        "format_version": FORMAT_VERSION,
        "image_size": size,
        "slots": slots,
        "input": "uint8 [batch, slot, height, width, RGB]; gray images repeated to 3 channels",
        "image_modality_types": list(IMAGE_TYPES),
        "classes": [
            {"dataset": d, "class": c, "modality_types": s["modality_types"]}
            for d, entry in record["datasets"].items()
            for c, s in entry["classes"].items()
        ],
        "statistics": rows,
        "checkpoint_step": step,
        "platforms": list(platforms),
        "versions": {
            "unimmad_jax": _version("unimmad_jax"),
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "calling_convention": exported.calling_convention_version,
        },
        "config": meta["config"],
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimmad_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir with its calibration.json")
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated subset of cpu,cuda,tpu")
    args = parser.parse_args(argv)
    try:
        out = export_workdir(args.workdir, args.out, tuple(args.platforms.split(",")))
    except (InvalidDataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} to {out / MODEL_FILE} and {out / METADATA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
