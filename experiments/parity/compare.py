"""Reproducibility against the PyTorch release: run a converted model on a parity case, compare.

See docs/parity.md for the cases and the tolerances.

    python -m experiments.parity.compare --checkpoint DIR --case tests/data/parity/cases/official_128.npz
    python -m experiments.parity.compare --checkpoint DIR --case tests/data/parity/cases/trajectory_128.npz

DIR is a model checkpoint written by `python -m unimmad_jax.convert official` from a reference
checkpoint folder with the case's weights.  A single-step case holds the reference's inputs and
outputs: eval-mode features, gates, maps and scores; train-mode losses in float32 and float64;
float64 gradients of the total loss.  The model runs on the valid pairs only, packed
(`unimmad_jax.packing`) as the loaders pack them.  A trajectory case (it has `train_losses`) holds the batches
of a short training run of the reference in float64: it is replayed with the project's own
training step, optimizer and schedule, then compared step by step (losses, learning rates), by
BatchNorm buffer and parameter change, and by the eval-mode maps and scores after training;
`--float32` replays it in float32 and reports the drift from the float64 reference instead.
Prints one row per output with its difference and tolerance, and exits 0 only when every row is
within tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from unimmad_jax import anomaly_map, convert, packing, sharding, train, weights
from unimmad_jax.config import default_config, loss_config
from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models.layers import CONV_IMPLS
from unimmad_jax.models.unimmad import UniMMAD

TOLERANCES = {  # docs/parity.md#tolerances
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
TRAJECTORY_TOLERANCES = {  # float64, docs/parity.md#the-trajectory-case
    "step_loss": 1e-7,  # relative
    "learning_rate": 1e-12,  # relative
    "buffer": 1e-5,  # relative L2, per key
    "delta_norm": (5e-4, 1e-7),  # |ours - ref| <= 5e-4 ref + 1e-7
    "anomaly_map_raw": 2e-4,
    "anomaly_map": 1e-4,
    "image_score": 1e-4,
}
STEP_LOSSES = ("loss", "cos_loss", "moe_loss")
"""The columns of a trajectory case's `train_losses`: total, DeC, MoE."""
REFERENCE_LOSS = LossConfig(weighting="batch_mean", moe_anneal="reference", moe_horizon=200)


def case_inputs(case, prefix: str = "", slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Channels-last images `[B, S, H, W, 3]` of `<prefix>specific_images` and the slot mask; S = `slots`,
    by default the largest modality count."""
    counts = case[f"{prefix}modality_num"]
    slots = slots or int(counts.max())
    images = case[f"{prefix}specific_images"][:, :slots].transpose(0, 1, 3, 4, 2)
    mask = np.arange(slots)[None, :] < counts[:, None]
    return images, mask


def packed_pairs(mask: np.ndarray, budget: int | None = None) -> dict[str, np.ndarray]:
    """The pair fields of a batch as one group of `budget` pairs (default: exactly its valid pairs)."""
    return packing.pack_pairs(mask, groups=1, budget=int(mask.sum()) if budget is None else budget)


def reference_pairs(case, mask: np.ndarray) -> np.ndarray:
    """Our packed pair (`packed_pairs(mask)`) of each of the reference's pairs, in the reference's order."""
    slots = mask.shape[1]
    ours = case["pair_sample"] * slots + case["pair_slot"]
    if not mask.reshape(-1)[ours].all() or len(ours) != mask.sum():
        raise SystemExit("the case's pairs (pair_sample, pair_slot) are not its valid modality slots")
    # Packed pairs are the valid (sample, slot) in sample-major order: a pair's rank among them.
    return np.searchsorted(np.flatnonzero(mask.reshape(-1)), ours)


def pair_index(fields: dict[str, np.ndarray]) -> packing.PairIndex:
    return packing.PairIndex(*(jnp.asarray(fields[key]) for key in packing.PAIR_KEYS))


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
            tolerance = "-" if r["tolerance"] == np.inf else f"{r['tolerance']:9.1e}"
            ok = "-" if r["tolerance"] == np.inf else "yes" if r["ok"] else "NO"
            print(f"{r['output']:<{width}}  {r['measure']:<9} {r['value']:11.3e}  {tolerance:>9}  {ok}")

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)


def compare_eval(model, variables, images, mask, case, valid, report: Report) -> None:
    batch = images.shape[0]

    @jax.jit
    def run(variables, images, mask, pairs):
        out = model.apply(variables, images, mask, train=False, pairs=pairs)
        raw = anomaly_map.raw_anomaly_map(out, batch, model.config.image_size)
        blurred = anomaly_map.blur(raw)
        return out, raw, blurred, anomaly_map.image_score(blurred)

    out, raw, blurred, score = run(variables, jnp.asarray(images), jnp.asarray(mask), pair_index(packed_pairs(mask)))
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
    def loss(params, batch_stats, images, mask, pairs, loss_weight, epoch):
        variables = {"params": params, "batch_stats": batch_stats}
        out, _ = model.apply(variables, images, mask, train=True, pairs=pairs, mutable=["batch_stats"])
        return total_loss(out, loss_weight, epoch, REFERENCE_LOSS)

    return loss


def compare_train(model, variables, images, mask, case, report: Report, gradients: bool) -> None:
    loss = train_loss_fn(model)
    loss64 = train_loss_fn(UniMMAD(dataclasses.replace(model.config, dtype="float64")))
    args32 = (
        variables["params"],
        variables["batch_stats"],
        jnp.asarray(images),
        jnp.asarray(mask),
        pair_index(packed_pairs(mask)),
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
    (total, parts), grads = jax.jit(jax.value_and_grad(loss64, has_aux=True))(*args64)
    for name, value in (("total_loss", total), ("cos_loss", parts["cos_loss"]), ("moe_loss", parts["moe_loss"])):
        report.relative(f"train64_{name}", value, case[f"train64_{name}"], TOLERANCES["loss64"])
    ours = convert.to_reference_layout(convert.reference_key_map(model.config), {"params": grads})
    by_name = {f"grad/{name}/{k}": v for part, name in convert.GRADIENT_PARTS.items() for k, v in ours[part].items()}
    for key in sorted(k for k in case.files if k.startswith("grad/")):
        if key not in by_name:
            raise SystemExit(f"{key}: the case has a gradient for a key the model does not train")
        report.relative(key, by_name[key], case[key], TOLERANCES["grad64"], measure="rel-L2")


def trajectory_slots(case, steps: int) -> tuple[int, int]:
    """One slot count and one budget of pairs for every batch of the run: one compilation."""
    counts = [case[f"batch{i}/modality_num"] for i in range(steps)]
    return max(int(c.max()) for c in [*counts, case["eval_batch/modality_num"]]), max(int(c.sum()) for c in counts)


def replay_training(model: UniMMAD, variables: dict, case, dtype, slots: int, budget: int):
    """The case's batches through the project's training step (as `unimmad_jax.loop` builds it, for
    `train.num_epochs` = the case's epochs) on one device; returns the final state, the per-step
    losses `[steps, 3]` and learning rates."""
    epochs, per_epoch = int(case["epochs"]), int(case["steps_per_epoch"])
    config = default_config()
    config.train.num_epochs = epochs
    tx = train.make_optimizer(config, per_epoch, variables["params"])
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        tx=tx,
    )
    mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    state = jax.device_put(state, sharding.replicated(mesh))  # as the loop places it: one compilation
    step_fn = train.make_train_step(model, loss_config(config), mesh)
    schedule = train.learning_rate_schedule(config, per_epoch)
    losses, rates = [], []
    for step in range(epochs * per_epoch):
        images, mask = case_inputs(case, f"batch{step}/", slots)
        batch = {
            "specific_images": jnp.asarray(images, dtype),
            "modality_mask": jnp.asarray(mask),
            "loss_weight": jnp.asarray(case[f"batch{step}/loss_weight"], dtype),
            **packed_pairs(mask, budget),
        }
        rates.append(float(schedule(step)))
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, jnp.asarray(step // per_epoch, jnp.int32))
        losses.append([float(metrics[name]) for name in STEP_LOSSES])
        print(f"step {step}: loss {losses[-1][0]:.10g}, lr {rates[-1]:.3g} ({time.perf_counter() - start:.0f} s)")
    return state, np.asarray(losses), np.asarray(rates)


def evaluate_one_by_one(model: UniMMAD, variables: dict, images, mask):
    """Eval-mode raw and blurred maps `[B, H, W]` and image scores `[B]`, one sample at a time as the reference."""

    @jax.jit
    def run(variables, images, mask, pairs):
        out = model.apply(variables, images, mask, train=False, pairs=pairs)
        raw = anomaly_map.raw_anomaly_map(out, 1, model.config.image_size)
        blurred = anomaly_map.blur(raw)
        return raw, blurred, anomaly_map.image_score(blurred)

    # Each sample with as many pairs as slots (padding pairs where it has fewer): one compilation.
    outputs = [
        run(variables, images[b : b + 1], mask[b : b + 1], pair_index(packed_pairs(mask[b : b + 1], mask.shape[1])))
        for b in range(images.shape[0])
    ]
    return [np.concatenate([np.asarray(o[i]) for o in outputs]) for i in range(3)]


def compare_trajectory(model: UniMMAD, variables: dict, case, report: Report, dtype, drift_only: bool) -> None:
    tolerances = {k: np.inf for k in TRAJECTORY_TOLERANCES} if drift_only else TRAJECTORY_TOLERANCES
    steps = int(case["epochs"]) * int(case["steps_per_epoch"])
    slots, budget = trajectory_slots(case, steps)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
    initial = jax.tree_util.tree_map(np.array, variables["params"])  # the step donates the state
    state, losses, rates = replay_training(model, variables, case, dtype, slots, budget)

    for step in range(steps):
        for column, name in enumerate(STEP_LOSSES):
            report.relative(
                f"step{step}_{name}", losses[step, column], case["train_losses"][step, column], tolerances["step_loss"]
            )
        report.relative(f"step{step}_learning_rate", rates[step], case["train_lr"][step], tolerances["learning_rate"])

    entries = convert.reference_key_map(model.config)
    buffers = convert.to_reference_layout(entries, {"batch_stats": jax.device_get(state.batch_stats)})
    delta = jax.tree_util.tree_map(lambda final, start: np.asarray(final) - start, state.params, initial)
    deltas = convert.to_reference_layout(entries, {"params": delta})
    left_out = []
    for key in sorted(k for k in case.files if k.startswith("buffer/")):
        part, name = key.split("/", 2)[1:]
        if convert.UNUSED_KEYS.search(name):  # layer4: the reference computes it and throws it away
            left_out.append(name)
        elif name not in buffers.get(part, {}):
            raise SystemExit(f"{key}: the case has a BatchNorm buffer the model does not have")
        else:
            report.relative(key, buffers[part][name], case[key], tolerances["buffer"], measure="rel-L2")
    scale, floor = TRAJECTORY_TOLERANCES["delta_norm"]
    for key in sorted(k for k in case.files if k.startswith("delta_norm/")):
        part, name = key.split("/", 2)[1:]
        if name in deltas.get(part, {}):
            ours = np.linalg.norm(deltas[part][name].astype(np.float64))
        elif convert.UNUSED_KEYS.search(name):
            ours = 0.0  # not in the model: it never changes
        else:
            raise SystemExit(f"{key}: the case has a parameter the model does not have")
        reference = float(case[key])
        tolerance = np.inf if drift_only else scale * reference + floor
        report.add(key, "abs", abs(ours - reference), tolerance)

    images, mask = case_inputs(case, "eval_batch/", slots)
    final = {"params": state.params, "batch_stats": state.batch_stats}
    raw, blurred, score = evaluate_one_by_one(model, final, jnp.asarray(images, dtype), jnp.asarray(mask))
    report.max_abs("eval_anomaly_map_raw", raw, case["eval_anomaly_map_raw"], tolerances["anomaly_map_raw"])
    report.max_abs("eval_anomaly_map", blurred, case["eval_anomaly_map"], tolerances["anomaly_map"])
    report.max_abs("eval_image_score", score, case["eval_image_score"], tolerances["image_score"])
    if left_out:
        print(f"left out {len(left_out)} buffers of layers the model does not build (e.g. {left_out[0]})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model checkpoint from `unimmad_jax.convert official`")
    parser.add_argument("--case", required=True, help="a parity case .npz (single step or trajectory)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--skip-gradients", action="store_true", help="leave out the float64 gradient rows")
    parser.add_argument(
        "--conv-impl", choices=CONV_IMPLS, help="the layer forms (model.conv_impl); default: the checkpoint's"
    )
    parser.add_argument(
        "--float32", action="store_true", help="trajectory cases: run in float32, report the drift (no tolerances)"
    )
    args = parser.parse_args(argv)

    cfg, variables = weights.complete_model(args.checkpoint)
    case = np.load(args.case)
    trajectory = "train_losses" in case.files
    if args.float32 and not trajectory:
        raise SystemExit(f"--float32 is for trajectory cases; {args.case} has no train_losses")
    # float64 for the gradient rows and the trajectory (float32 rows stay float32); off for --float32, as users train
    jax.config.update("jax_enable_x64", not args.float32)
    size = int(case["size"]) if trajectory else case["specific_images"].shape[-1]
    if size != cfg.image_size:
        raise SystemExit(f"the case is {size} px, the checkpoint {cfg.image_size} px")
    compute_dtype = "float64" if trajectory and not args.float32 else "float32"
    model = UniMMAD(dataclasses.replace(cfg, dtype=compute_dtype, conv_impl=args.conv_impl or cfg.conv_impl))

    report = Report()
    start = time.perf_counter()
    if trajectory:
        dtype = jnp.float32 if args.float32 else jnp.float64
        compare_trajectory(model, variables, case, report, dtype, drift_only=args.float32)
    else:
        images, mask = case_inputs(case)
        valid = reference_pairs(case, mask)
        variables = jax.tree_util.tree_map(jnp.asarray, variables)
        compare_eval(model, variables, images, mask, case, valid, report)
        compare_train(model, variables, images, mask, case, report, gradients=not args.skip_gradients)
    report.print()
    checked = sum(r["tolerance"] != np.inf for r in report.rows)
    print(
        f"{sum(r['ok'] for r in report.rows if r['tolerance'] != np.inf)}/{checked} within tolerance"
        f"{f', {len(report.rows) - checked} reported' if checked < len(report.rows) else ''}"
        f" ({time.perf_counter() - start:.0f} s)"
    )
    if args.json:
        rows = [{**r, "tolerance": None if r["tolerance"] == np.inf else r["tolerance"]} for r in report.rows]
        with open(args.json, "w") as f:
            json.dump({"case": args.case, "checkpoint": args.checkpoint, "ok": report.ok, "rows": rows}, f, indent=1)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
