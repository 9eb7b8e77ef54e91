"""Check the independent PyTorch reference (`torch_reference.py`) against a parity case.

    VENV/bin/python -m experiments.parity.check_torch_reference            # official_128.npz
    VENV/bin/python -m experiments.parity.check_torch_reference --case tests/data/parity/cases/unseen_64.npz
    VENV/bin/python -m experiments.parity.check_torch_reference --case tests/data/parity/cases/trajectory_128.npz

Runs the model on the case's inputs with the recipe weights of the case's salt and
image size, and prints the max-abs / relative difference of every output and
gradient against the tolerances of docs/parity.md#tolerances; a trajectory case is trained
again in float64 and compared step by step, by buffer, by parameter change and by the final
maps (docs/parity.md#the-trajectory-case). Exit status 0 only if all pass.
With `--via-checkpoint` the weights go through a reference checkpoint folder written by
`reference_checkpoint.py` and loaded with safetensors.torch (tests that path too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from experiments.parity import make_case as mpc
from experiments.parity import reference_checkpoint as rc

OFFICIAL = rc.PARITY_DIR / "cases" / "official_128.npz"

# docs/parity.md#tolerances
TOL = {
    "prior": 1e-5,  # max-abs
    "decompressed": 5e-4,  # max-abs
    "gate_score": 1e-4,  # max-abs (scores are softmax outputs)
    "map": 1e-4,  # raw and blurred, max-abs
    "score": 1e-4,  # image score, max-abs
    "loss32": 1e-4,  # relative
    "loss64": 1e-9,  # relative
    "grad64": 1e-6,  # relative L2 error
}
# docs/parity.md#the-trajectory-case
TRAJECTORY_TOL = {"loss": 1e-7, "lr": 1e-12, "buffer": 1e-5, "map_raw": 2e-4, "map": 1e-4, "score": 1e-4}
DELTA_NORM_TOL = (5e-4, 1e-7)  # |ours - ref| <= 5e-4 ref + 1e-7


def trajectory_rows(z) -> list[tuple[str, float, float, str]]:
    """Train the case's run again with the torch reference; one row per step loss, rate, buffer, change, map."""
    steps = int(z["epochs"]) * int(z["steps_per_epoch"])

    def batch(prefix):
        si = z[f"{prefix}/specific_images"]
        return (
            si.reshape(si.shape[0], -1, *si.shape[3:]),
            si,
            z[f"{prefix}/modality_num"].tolist(),
            z[f"{prefix}/loss_weight"],
        )

    size, salt = int(z["size"]), str(z["salt"])
    case = mpc.compute_trajectory_case(
        rc.reference_weights(salt, size),
        size,
        [batch(f"batch{i}") for i in range(steps)],
        int(z["epochs"]),
        int(z["steps_per_epoch"]),
        batch("eval_batch"),
        salt,
    )
    rows = []
    for step in range(steps):
        for column, name in enumerate(("total", "cos", "moe")):
            ours, ref = case["train_losses"][step, column], z["train_losses"][step, column]
            rows.append((f"step{step}_{name}_loss", abs(ours - ref) / abs(ref), TRAJECTORY_TOL["loss"], "relative"))
        ours, ref = case["train_lr"][step], z["train_lr"][step]
        rows.append((f"step{step}_lr", abs(ours - ref) / ref, TRAJECTORY_TOL["lr"], "relative"))
    for key in (k for k in z.files if k.startswith("buffer/")):
        if ".layer4." in key:  # the release computes layer4 (and its statistics) and throws it away; we never run it
            continue
        value = np.linalg.norm(case[key] - z[key]) / np.linalg.norm(z[key])
        rows.append((key, float(value), TRAJECTORY_TOL["buffer"], "rel-L2"))
    scale, floor = DELTA_NORM_TOL
    for key in (k for k in z.files if k.startswith("delta_norm/")):
        ref = float(z[key])
        rows.append((key, abs(float(case[key]) - ref), scale * ref + floor, "abs"))
    for name, tol in (("eval_anomaly_map_raw", "map_raw"), ("eval_anomaly_map", "map"), ("eval_image_score", "score")):
        rows.append((name, float(np.abs(case[name] - z[name]).max()), TRAJECTORY_TOL[tol], "max-abs"))
    return rows


def report(rows) -> int:
    ok = True
    w = max(len(r[0]) for r in rows)
    for name, v, tol, kind in rows:
        good = v <= tol
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name:<{w}}  {kind:8s} {v:.3e}  (tol {tol:.0e})")
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description="check torch_reference.py against a parity case")
    ap.add_argument("--case", default=str(OFFICIAL))
    ap.add_argument("--via-checkpoint", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    z = np.load(a.case)
    if "train_losses" in z.files:
        return report(trajectory_rows(z))
    size = int(z["img"].shape[-1])
    salt = str(z["salt"])
    grad_keys = [k[len("grad/") :] for k in z.files if k.startswith("grad/")]
    print(
        f"case {a.case}: salt {salt!r}, H=W={size}, modality_num {z['modality_num'].tolist()}, "
        f"loss_weight {z['loss_weight'].tolist()}, epoch {int(z['epoch'])}, {len(grad_keys)} gradients"
    )

    tmp = None
    if a.via_checkpoint:
        tmp = tempfile.TemporaryDirectory()
        rc.write_reference_checkpoint(tmp.name, salt, size)
        weights = Path(tmp.name)
        print(f"weights via checkpoint folder {tmp.name}")
    else:
        weights = rc.reference_weights(salt, size)

    case, margins = mpc.compute_case(
        weights,
        size,
        z["img"],
        z["specific_images"],
        z["modality_num"],
        z["loss_weight"],
        int(z["epoch"]),
        salt,
        grad_keys,
    )
    if tmp is not None:
        tmp.cleanup()

    rows = []  # (name, value, tol, kind)

    def maxabs(name, tol):
        rows.append(
            (name, float(np.abs(case[name].astype(np.float64) - z[name].astype(np.float64)).max()), tol, "max-abs")
        )

    for key in ("pair_sample", "pair_slot"):
        rows.append((key, float(not np.array_equal(case[key], z[key])), 0.0, "mismatch"))
    for lvl in range(3):
        maxabs(f"eval_prior_l{lvl}", TOL["prior"])
        maxabs(f"eval_decompressed_l{lvl}", TOL["decompressed"])
    for lvl in range(3):
        for br in range(3):
            k = f"eval_gate_idx_{lvl}_{br}"
            rows.append((k, float(np.sum(case[k] != z[k])), 0.0, "mismatch"))
            maxabs(f"eval_gate_score_{lvl}_{br}", TOL["gate_score"])
    maxabs("eval_anomaly_map_raw", TOL["map"])
    maxabs("eval_anomaly_map", TOL["map"])
    maxabs("eval_image_score", TOL["score"])
    for pre, tol in (("train_", TOL["loss32"]), ("train64_", TOL["loss64"])):
        for n in ("total", "cos", "moe"):
            k = f"{pre}{n}_loss"
            r = float(z[k])
            rows.append((k, abs(float(case[k]) - r) / abs(r), tol, "relative"))
    for gk in grad_keys:
        k = f"grad/{gk}"
        g, r = case[k], z[k].astype(np.float64)
        rows.append((k, float(np.linalg.norm(g - r) / np.linalg.norm(r)), TOL["grad64"], "rel-L2"))
    rows.append(("min_gate_margin", abs(float(case["min_gate_margin"]) - float(z["min_gate_margin"])), 1e-5, "abs"))

    print(f"gate logit margins: {margins}")
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
