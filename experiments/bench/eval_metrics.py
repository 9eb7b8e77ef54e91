"""Time today's evaluation metrics (the frozen scikit-learn implementation, tests/metrics_oracle.py) against
`unimmad_jax.metrics` in one run, and measure the peak memory of a 2-process evaluation.

    python -m experiments.bench.eval_metrics --images=400 --size=256 --repeats=2
    python -m experiments.bench.eval_metrics --memory --images=4000 --classes=10 --size=256 --gathered-metrics=package

The first form times one class of synthetic maps (blob defects on half the images, maps correlated
with them), old and new interleaved so that a machine shared with other work slows both alike, and
prints both times, their ratio and the largest difference of the seven metrics.

`--memory` runs the evaluation of a synthetic split in 2 processes (a localhost coordinator, one CPU
device each), each scoring its share of every batch as `evaluate.score_split` does, once gathering
every batch's maps to every process and computing the metrics there (the frozen implementation's
evaluation), once keeping the maps on the devices (`evaluate.ScoredSplit`, `evaluate.per_class_metrics`);
it prints each process's peak resident memory (`ru_maxrss`), and that before the evaluation began.
`--gathered-metrics=package` computes the gathered form's metrics with `unimmad_jax.metrics` instead of
the frozen scikit-learn implementation: the same data flow in far less time, and a lower bound on its
peak (scikit-learn's curves add copies of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np

BATCH = 32  # images a global batch


def synthetic_class(num_images: int, size: int, seed: int):
    """Labels, image scores, masks and maps of one class: half the images hold 1-3 elliptic defects."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % 2
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((num_images, size, size), np.uint8)
    for image in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(size // 8, size - size // 8, 2)
            ry, rx = rng.uniform(2, size / 12, 2)
            masks[image][((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + masks * rng.uniform(0.1, 0.8, (num_images, 1, 1)).astype(
        np.float32
    )
    scores = maps.reshape(num_images, -1).max(axis=1) + 0.2 * rng.random(num_images, dtype=np.float32)
    return labels, scores, masks, maps


def time_metrics(images: int, size: int, repeats: int) -> dict:
    from tests import metrics_oracle
    from unimmad_jax import metrics

    case = synthetic_class(images, size, seed=0)
    timings = {"oracle": [], "package": []}
    for _ in range(repeats):
        for name, compute in (("oracle", metrics_oracle.compute_metrics), ("package", metrics.compute_metrics)):
            start = time.perf_counter()
            values = compute(*case)
            timings[name].append(time.perf_counter() - start)
            if name == "oracle":
                expected = values
    difference = max(abs(values[k] - expected[k]) for k in metrics.METRIC_NAMES)
    best = {name: min(seconds) for name, seconds in timings.items()}
    return {
        "images": images,
        "size": size,
        "seconds": timings,
        "best_seconds": best,
        "seconds_per_1000_images": {name: 1000 * s / images for name, s in best.items()},
        "speedup": best["oracle"] / best["package"],
        "max_metric_difference": difference,
    }


def memory_worker(
    address: str, process_id: int, mode: str, images: int, classes: int, size: int, gathered_metrics: str
) -> None:
    """One of 2 processes: score a synthetic split batch by batch and evaluate it `mode`'s way."""
    import jax

    from unimmad_jax import evaluate, metrics, sharding

    sharding.initialize_distributed(coordinator_address=address, num_processes=2, process_id=process_id)
    mesh = sharding.data_mesh()
    per_class = images // classes
    local = BATCH // 2
    start_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    scored = evaluate.ScoredSplit(mesh)
    gathered = {"anomaly_map": [], "gt_mask": [], "label": [], "image_score": [], "class_name": []}
    for class_index in range(classes):
        labels, scores, masks, maps = synthetic_class(per_class, size, seed=class_index)
        for first in range(0, per_class, BATCH):
            rows = slice(first + process_id * local, min(first + (process_id + 1) * local, per_class))
            count = max(rows.stop - rows.start, 0)
            pad = local - count

            def padded(array, rows=rows, pad=pad):
                return np.concatenate([array[rows], np.zeros((pad, *array.shape[1:]), array.dtype)])

            batch = {
                "gt_mask": padded(masks),
                "label": padded(labels),
                "valid": np.arange(local) < count,
                "class_name": np.asarray([f"class_{class_index}"] * local),
            }
            out = sharding.to_global(
                {"anomaly_map": padded(maps), "image_score": padded(scores)}, mesh, ("anomaly_map", "image_score")
            )
            if mode == "devices":
                scored.add(out, batch)
                continue
            rows_all = sharding.gather(
                {**out, "gt_mask": batch["gt_mask"], "label": batch["label"], "valid": batch["valid"]}
            )
            rows_all["class_name"] = sharding.gather_text(batch["class_name"])
            valid = rows_all.pop("valid").astype(bool)
            for key, value in rows_all.items():
                gathered[key].append(value[valid])
    if mode == "devices":
        results = evaluate.per_class_metrics(scored)
    else:
        from tests import metrics_oracle

        compute = metrics_oracle.compute_metrics if gathered_metrics == "oracle" else metrics.compute_metrics
        columns = {key: np.concatenate(values) for key, values in gathered.items()}
        results = {}
        for name in dict.fromkeys(columns["class_name"]):
            rows = columns["class_name"] == name
            results[name] = compute(
                columns["label"][rows],
                columns["image_score"][rows],
                columns["gt_mask"][rows],
                columns["anomaly_map"][rows],
            )
    jax.block_until_ready(scored.batches)
    print(
        json.dumps(
            {
                "process": process_id,
                "mode": mode,
                "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "start_peak_bytes": start_peak_bytes,
                "seconds": time.perf_counter() - start,
                "p_auroc": [r["p_auroc"] for r in results.values()],
            }
        ),
        flush=True,
    )


def measure_memory(images: int, classes: int, size: int, gathered_metrics: str) -> dict:
    results = {}
    for mode in ("gathered", "devices"):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            address = f"localhost:{s.getsockname()[1]}"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        command = [
            sys.executable,
            "-m",
            "experiments.bench.eval_metrics",
            "--worker",
            address,
            "--mode",
            mode,
            f"--images={images}",
            f"--classes={classes}",
            f"--size={size}",
            f"--gathered-metrics={gathered_metrics}",
        ]
        processes = [
            subprocess.Popen([*command, f"--process-id={i}"], env=env, stdout=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        outputs = [p.communicate()[0] for p in processes]
        if any(p.returncode for p in processes):
            raise RuntimeError(f"a --memory worker of mode {mode} failed:\n" + "\n".join(outputs))
        results[mode] = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    maps_bytes = images * size * size * 4
    return {
        "images": images,
        "classes": classes,
        "size": size,
        "gathered_metrics": gathered_metrics,
        "maps_bytes": maps_bytes,
        "processes": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="Images of the class (with --memory: of the split).")
    parser.add_argument("--size", type=int, default=256, help="Map side in pixels.")
    parser.add_argument("--repeats", type=int, default=2, help="Timings of each implementation, interleaved.")
    parser.add_argument("--memory", action="store_true", help="Peak memory of a 2-process evaluation instead.")
    parser.add_argument("--classes", type=int, default=10, help="With --memory: classes of the split.")
    parser.add_argument(
        "--gathered-metrics",
        choices=("oracle", "package"),
        default="oracle",
        help="With --memory: the gathered form's metric functions (package: the same data flow, faster).",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("gathered", "devices"), help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(
            args.worker, args.process_id, args.mode, args.images, args.classes, args.size, args.gathered_metrics
        )
    elif args.memory:
        print(json.dumps(measure_memory(args.images, args.classes, args.size, args.gathered_metrics), indent=1))
    else:
        print(json.dumps(time_metrics(args.images, args.size, args.repeats), indent=1))


if __name__ == "__main__":
    main()
