"""Reproducibility against the PyTorch release: run a converted model on a parity case, compare (SPEC 8).

    python experiments/compare_pytorch.py --checkpoint DIR --case ../shared/parity/cases/official_128.npz

DIR is a model checkpoint written by `python -m unimmad_jax.convert official` from a reference
checkpoint folder with the case's weights.  The case holds the reference's inputs and outputs:
eval-mode features, gates, maps and scores; train-mode losses in float32 and float64; float64
gradients of the total loss.  Prints one row per output with its difference and tolerance,
and exits 0 only when every row is within tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 for the gradient rows; float32 rows stay float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unimmad_jax import anomaly_map, convert, model_io  # noqa: E402
from unimmad_jax.losses import LossConfig, total_loss  # noqa: E402
from unimmad_jax.models.unimmad import UniMMAD  # noqa: E402

TOLERANCES = {  # SPEC 8
    "prior": 1e-5,
    "decompressed": 5e-4,
    "gate_index": 0,
    "gate_score": 1e-4,
    "anomaly_map_raw": 1e-4,
    "anomaly_map": 1e-4,
    "image_score": 1e-4,
    "loss32": 1e-4,
    "loss64": 1e-9,
    "grad64": 1e-6,
}
REFERENCE_LOSS = LossConfig(weighting="batch_mean", moe_anneal="reference", moe_horizon=200)


def case_inputs(case) -> tuple[np.ndarray, np.ndarray]:
    """Channels-last images `[B, S, H, W, 3]` with S = the largest modality count, and the slot mask."""
    counts = case["modality_num"]
    slots = int(counts.max())
    images = case["specific_images"][:, :slots].transpose(0, 1, 3, 4, 2)
    mask = np.arange(slots)[None, :] < counts[:, None]
    return images, mask


def reference_pairs(case, mask: np.ndarray) -> np.ndarray:
    """Our pair index (`b * S + s`) of each of the reference's pairs, in the reference's order."""
    slots = mask.shape[1]
    ours = case["pair_sample"] * slots + case["pair_slot"]
    if not mask.reshape(-1)[ours].all() or len(ours) != mask.sum():
        raise SystemExit("the case's pairs (pair_sample, pair_slot) are not its valid modality slots")
    return ours


def channels_first(x) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, 1)


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, measure: str, value: float, tolerance: float) -> None:
        self.rows.append(
            {
                "output": name,
                "measure": measure,
                "value": float(value),
                "tolerance": tolerance,
                "ok": bool(value <= tolerance),
            }
        )

    def max_abs(self, name: str, ours, reference, tolerance: float) -> None:
        ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
        if ours.shape != reference.shape:
            raise SystemExit(f"{name}: shape {ours.shape} differs from the case's {reference.shape}")
        self.add(name, "max-abs", np.max(np.abs(ours - reference)), tolerance)

    def relative(self, name: str, ours, reference, tolerance: float, measure: str = "relative") -> None:
        ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
        self.add(name, measure, np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-300), tolerance)

    def print(self) -> None:
        width = max(len(r["output"]) for r in self.rows)
        print(f"{'output':<{width}}  {'measure':<9} {'difference':>11}  {'tolerance':>9}  ok")
        for r in self.rows:
            print(
                f"{r['output']:<{width}}  {r['measure']:<9} {r['value']:11.3e}  {r['tolerance']:9.1e}  "
                f"{'yes' if r['ok'] else 'NO'}"
            )

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)


def compare_eval(model, variables, images, mask, case, valid, report: Report) -> None:
    batch = images.shape[0]

    @jax.jit
    def run(variables, images, mask):
        out = model.apply(variables, images, mask, train=False)
        raw = anomaly_map.raw_anomaly_map(out, batch, model.config.image_size)
        blurred = anomaly_map.blur(raw)
        return out, raw, blurred, anomaly_map.image_score(blurred)

    out, raw, blurred, score = run(variables, jnp.asarray(images), jnp.asarray(mask))
    for level in range(len(out.prior)):
        report.max_abs(
            f"eval_prior_l{level}",
            channels_first(out.prior[level])[valid],
            case[f"eval_prior_l{level}"],
            TOLERANCES["prior"],
        )
        report.max_abs(
            f"eval_decompressed_l{level}",
            channels_first(out.decompressed[level])[valid],
            case[f"eval_decompressed_l{level}"],
            TOLERANCES["decompressed"],
        )
    for level, branches in enumerate(out.routing):
        for branch, routing in enumerate(branches):
            name = f"{level}_{branch}"
            mismatches = np.sum(np.asarray(routing.index)[valid] != case[f"eval_gate_idx_{name}"])
            report.add(f"eval_gate_idx_{name}", "unequal", mismatches, TOLERANCES["gate_index"])
            report.max_abs(
                f"eval_gate_score_{name}",
                np.asarray(routing.score)[valid],
                case[f"eval_gate_score_{name}"],
                TOLERANCES["gate_score"],
            )
    report.max_abs("eval_anomaly_map_raw", raw, case["eval_anomaly_map_raw"], TOLERANCES["anomaly_map_raw"])
    report.max_abs("eval_anomaly_map", blurred, case["eval_anomaly_map"], TOLERANCES["anomaly_map"])
    report.max_abs("eval_image_score", score, case["eval_image_score"], TOLERANCES["image_score"])


def train_loss_fn(model):
    def loss(params, batch_stats, images, mask, loss_weight, epoch):
        out, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, mask, train=True, mutable=["batch_stats"]
        )
        return total_loss(out, loss_weight, epoch, REFERENCE_LOSS)

    return loss


def compare_train(model, variables, images, mask, case, report: Report, gradients: bool) -> None:
    loss = train_loss_fn(model)
    args32 = (
        variables["params"],
        variables["batch_stats"],
        jnp.asarray(images),
        jnp.asarray(mask),
        jnp.asarray(case["loss_weight"]),
        jnp.asarray(case["epoch"]),
    )
    total, parts = jax.jit(loss)(*args32)
    for name, value in (("total_loss", total), ("cos_loss", parts["cos_loss"]), ("moe_loss", parts["moe_loss"])):
        report.relative(f"train_{name}", value, case[f"train_{name}"], TOLERANCES["loss32"])
    if not gradients:
        return
    args64 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, args32
    )
    (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(*args64)
    for name, value in (("total_loss", total), ("cos_loss", parts["cos_loss"]), ("moe_loss", parts["moe_loss"])):
        report.relative(f"train64_{name}", value, case[f"train64_{name}"], TOLERANCES["loss64"])
    ours = convert.to_reference_layout(convert.reference_key_map(model.config), {"params": grads})
    by_name = {f"grad/{name}/{k}": v for part, name in convert.GRADIENT_PARTS.items() for k, v in ours[part].items()}
    for key in sorted(k for k in case.files if k.startswith("grad/")):
        if key not in by_name:
            raise SystemExit(f"{key}: the case has a gradient for a key the model does not train")
        report.relative(key, by_name[key], case[key], TOLERANCES["grad64"], measure="rel-L2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model checkpoint from `unimmad_jax.convert official`")
    parser.add_argument("--case", required=True, help="a parity case .npz laid out like official_128.npz")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--skip-gradients", action="store_true", help="leave out the float64 gradient rows")
    args = parser.parse_args(argv)

    kind, cfg, variables = model_io.load(args.checkpoint)
    if kind != "model":
        raise SystemExit(f"{args.checkpoint} holds a {kind!r}, not a complete model")
    case = np.load(args.case)
    images, mask = case_inputs(case)
    if images.shape[2] != cfg.image_size:
        raise SystemExit(f"the case is {images.shape[2]} px, the checkpoint {cfg.image_size} px")
    valid = reference_pairs(case, mask)
    model = UniMMAD(cfg)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)

    report = Report()
    start = time.perf_counter()
    compare_eval(model, variables, images, mask, case, valid, report)
    compare_train(model, variables, images, mask, case, report, gradients=not args.skip_gradients)
    report.print()
    print(
        f"{sum(r['ok'] for r in report.rows)}/{len(report.rows)} within tolerance ({time.perf_counter() - start:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"case": args.case, "checkpoint": args.checkpoint, "ok": report.ok, "rows": report.rows}, f, indent=1
            )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
