"""Speed and cost of the model: images/s, GFLOPs per image (XLA's count), peak memory, compile time.

    python -m experiments.bench.benchmark --config=configs/unified.py --batch-size=4 --modalities=2 \\
        --image-size=256 --mode=infer --json=bench.json
    python -m experiments.bench.benchmark --config=configs/unified.py --sweep --out-dir=bench/

`infer` times the evaluation step (model, anomaly maps, blur, image scores); `train` the
whole optimizer step.  Inputs are random, `--modalities` of the `--slots` slots valid (default:
`config.data.num_slots`, at least `--modalities`); with `config.data.pack_pairs` the batch carries
exactly its valid pairs, one group per device, else every slot is computed.  Weights are randomly
initialised (speed does not depend on them).  The step is compiled
once, run `--warmup` times, then timed over `--steps` runs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments.bench import resident_memory

flags.DEFINE_integer("batch-size", 4, "Images per step.")
flags.DEFINE_integer("modalities", 2, "Valid modality slots per image (1..4).")
flags.DEFINE_integer("slots", None, "Modality slots per image, valid or padded (default: config.data.num_slots).")
flags.DEFINE_integer("image-size", None, "Overrides config.image_size.")
flags.DEFINE_enum("mode", "infer", ["infer", "train"], "What to time.")
flags.DEFINE_integer("steps", 3, "Timed steps.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
flags.DEFINE_string("json", None, "Write the result object here.")
flags.DEFINE_bool("sweep", False, "Vary batch size, modalities and image size; write a table and a plot.")
flags.DEFINE_string("out-dir", "benchmark", "Where --sweep writes sweep.md, sweep.json and sweep.png.")
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=False)
FLAGS = flags.FLAGS

PEAK_FLOPS = {  # dense, per chip: (float32 or TF32 matmul, bfloat16)
    "H200": (494e12, 989e12),
    "H100": (494e12, 989e12),
    "A100": (156e12, 312e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, (f32, bf16) in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else f32
    return None


def measure(
    config, batch_size: int, modalities: int, image_size: int, mode: str, steps: int, warmup: int, slots: int | None
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unimmad_jax import evaluate, packing, sharding, train, weights
    from unimmad_jax.config import loss_config, model_config
    from unimmad_jax.models.unimmad import UniMMAD, init_variables

    config.image_size = image_size
    model = UniMMAD(model_config(config))
    mesh = sharding.data_mesh()
    slots = max(modalities, slots or config.data.num_slots)
    rng = np.random.default_rng(0)
    mask = np.broadcast_to(np.arange(slots) < modalities, (batch_size, slots))
    batch = {
        "specific_images": rng.standard_normal((batch_size, slots, image_size, image_size, 3), np.float32)
        * mask[..., None, None, None],
        "modality_mask": mask,
        "loss_weight": np.ones(batch_size, np.float32),
    }
    if config.data.pack_pairs:
        groups = mesh.devices.size
        batch |= packing.pack_pairs(mask, groups, batch_size // groups * modalities)
    valid_images = batch["specific_images"][mask]
    batch = sharding.to_global(batch, mesh)
    if mode == "infer":
        variables = jax.device_put(init_variables(model, config.seed, slots), sharding.replicated(mesh))
        step = evaluate.make_score_fn(model, mesh)
        args = (variables, batch["specific_images"], batch["modality_mask"], packing.batch_pairs(batch))
    else:
        config.data.num_slots = slots
        images = valid_images
        state = train.create_train_state(model, config, 1, weights.random_variables(model, config, images))
        state_sharding = sharding.state_sharding(state, mesh, config.train.fsdp)  # as the loop places it
        state = jax.device_put(state, state_sharding)
        step = train.make_train_step(model, loss_config(config), mesh, state_sharding)
        args = (state, batch, jnp.int32(0))

    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    resident_memory.reset_peak()
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    memory = compiled.memory_analysis()

    def run(args):
        out = compiled(*args)
        jax.block_until_ready(out)
        return (out[0], *args[1:]) if mode == "train" else args  # a train step consumes and returns the state

    for _ in range(warmup):
        args = run(args)
    start = time.perf_counter()
    for _ in range(steps):
        args = run(args)
    elapsed = time.perf_counter() - start

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    xla_peak = (
        None
        if memory is None
        else (
            memory.temp_size_in_bytes
            + memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
    )
    images_per_s = steps * batch_size / elapsed
    dtype = config.model.dtype
    peak = peak_flops(device.device_kind, dtype)
    achieved = flops * steps / elapsed
    return {
        "mode": mode,
        "batch_size": batch_size,
        "modalities": modalities,
        "slots": slots,
        "packed": bool(config.data.pack_pairs),
        "image_size": image_size,
        "dtype": dtype,
        "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "images_per_s": images_per_s,
        "seconds_per_step": elapsed / steps,
        "gflops_per_image": flops / batch_size / 1e9,
        "achieved_tflops": achieved / 1e12,
        "fraction_of_peak": None if peak is None else achieved / (peak * jax.device_count()),
        # On accelerators the allocator's peak; on a CPU, XLA's buffer plan of the step (arguments,
        # outputs and temporaries), and the process's peak resident memory over its life (compiling
        # included) and while stepping.
        "peak_memory_bytes": stats.get("peak_bytes_in_use", xla_peak),
        "xla_buffer_bytes": xla_peak,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stepping_peak_rss_bytes": resident_memory.peak_bytes(),
        "compile_s": compile_s,
    }


def describe(result: dict) -> str:
    fraction = "" if result["fraction_of_peak"] is None else f", {100 * result['fraction_of_peak']:.1f} % of peak"
    return (
        f"{result['mode']} b={result['batch_size']} m={result['modalities']} of {result['slots']} slots "
        f"({'packed' if result['packed'] else 'padded'}) {result['image_size']}px "
        f"{result['dtype']} on {result['device']}: {result['images_per_s']:.3f} images/s, "
        f"{result['gflops_per_image']:.1f} GFLOPs/image, {result['achieved_tflops']:.3f} TFLOP/s{fraction}, "
        f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB, compile {result['compile_s']:.1f} s"
    )


def sweep(config, out_dir: Path) -> list[dict]:
    """One axis at a time around (batch 4, 2 modalities, config image size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = dict(
        batch_size=FLAGS["batch-size"].value,
        modalities=FLAGS.modalities,
        image_size=FLAGS["image-size"].value or config.image_size,
    )
    axes = {"batch_size": (1, 2, 4, 8), "modalities": (1, 2, 3, 4), "image_size": (128, 256, 384)}
    results = []
    for axis, values in axes.items():
        for value in values:
            point = {**base, axis: value}
            result = measure(
                config.copy_and_resolve_references(),
                mode=FLAGS.mode,
                steps=FLAGS.steps,
                warmup=FLAGS.warmup,
                slots=FLAGS.slots,
                **point,
            )
            result["axis"] = axis
            print(describe(result), flush=True)
            results.append(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=1))
    lines = [
        "| varied | batch | modalities | size | images/s | GFLOPs/image | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['axis']} | {r['batch_size']} | {r['modalities']} | {r['image_size']} | {r['images_per_s']:.3f} "
        f"| {r['gflops_per_image']:.1f} | {r['peak_memory_bytes'] / 2**30:.2f} |"
        for r in results
    ]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    figure, plots = plt.subplots(2, 3, figsize=(12, 6.5))
    for column, axis in enumerate(axes):
        points = [r for r in results if r["axis"] == axis]
        xs = [r[axis] for r in points]
        plots[0, column].plot(xs, [r["images_per_s"] for r in points], "o-")
        plots[1, column].plot(xs, [r["gflops_per_image"] * r["batch_size"] for r in points], "o-")
        plots[1, column].set_xlabel(axis)
    plots[0, 0].set_ylabel("images/s")
    plots[1, 0].set_ylabel("GFLOPs per step")
    figure.suptitle(f"UniMMAD {FLAGS.mode}, {results[0]['device']}, {results[0]['dtype']}")
    figure.tight_layout()
    figure.savefig(out_dir / "sweep.png", dpi=100)
    return results


def main(argv) -> int:
    del argv
    config = FLAGS.config
    if FLAGS.sweep:
        sweep(config, Path(FLAGS["out-dir"].value))
        return 0
    result = measure(
        config,
        FLAGS["batch-size"].value,
        FLAGS.modalities,
        FLAGS["image-size"].value or config.image_size,
        FLAGS.mode,
        FLAGS.steps,
        FLAGS.warmup,
        FLAGS.slots,
    )
    print(describe(result))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
