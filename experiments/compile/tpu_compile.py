"""Compile the training (or evaluation) step for a TPU slice on this machine, without a TPU.

    pip install "jax[tpu]==0.10.2"   # libtpu: the TPU compiler
    python -m experiments.compile.tpu_compile --config=configs/mvtec3d.py --config.model.dtype=bfloat16 \\
        --topology=v5e:16x16 --global-batch=2048 --json=v5e_16x16.json
    python -m experiments.compile.tpu_compile --config=configs/unified.py --topology=v4:2x2x2 --chip-config=megacore \\
        --find-max-batch
    python -m experiments.compile.tpu_compile --config=configs/unified.py --mode=eval --metrics-images=3700

The step is the one `unimmad_jax.main` runs: `train.make_train_step` (or `evaluate.make_score_fn`
with `--mode=eval`, and with `--metrics-images` the pixel metrics of one class as well) over a data
mesh of the topology's devices, traced from shapes alone and compiled ahead of time by libtpu's
compiler ("deviceless"): nothing is computed.  With `data.pack_pairs` the train step is the packed
one at the run's pair budget (`report.train_pair_budget`: from the prepared indexes, else from
what the builders declare), the step almost every batch runs.  Reported per
device: the peak HBM (arguments, outputs, code), XLA's FLOPs and bytes accessed, the share of
those bytes that HBM serves (XLA's count includes the chip's on-chip memory, where the compiled
layouts keep many buffers), the collectives of the compiled HLO with their bytes, roofline step
times from the chip's peak bf16 FLOP/s and HBM bandwidth (`CHIPS`) by either count of bytes, and
the instructions and model layers that access the most bytes.
`--find-max-batch` searches the largest per-chip batch whose step compiles within the chip's HBM;
above some batch the compiler rematerialises to fit, so check the FLOPs an image of the largest.

`model.conv_impl` "auto" means the accelerator's layer forms here (the step is compiled for a TPU
whatever this host is); `--config.model.conv_impl=cpu` compiles the CPU forms for comparison.
"""

from __future__ import annotations

import json
import sys
import time
from typing import NamedTuple

from experiments.compile.report import (
    accelerator_forms,
    compile_for_tpu_here,
    compile_step,
    compiler_peak,
    hlo_summary,
    next_batch,
    print_hlo_summary,
    roofline,
    step_description,
    topology_mesh,
    tpu_topology,
)

compile_for_tpu_here()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=False)
flags.DEFINE_string("topology", "v5e:2x4", "A TPU topology, e.g. v5e:2x4, v5e:16x16, v4:2x2x2, v5p:2x2x1.")
flags.DEFINE_string("chip-config", None, "libtpu's chip config, e.g. 'megacore' for v4 and v5p (one device a chip).")
flags.DEFINE_integer("global-batch", None, "Images per step over all devices; default: 8 per device.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "The training step or the evaluation (scoring) step.")
flags.DEFINE_string("json", None, "Write the report here.")
flags.DEFINE_bool("find-max-batch", False, "Also search the largest per-device batch that fits.")
flags.DEFINE_integer("top", 12, "How many instructions and layers to list by bytes accessed.")
flags.DEFINE_string("hlo", None, "Write the compiled HLO text here.")
flags.DEFINE_integer(
    "metrics-images",
    0,
    "With --mode=eval, also compile the pixel metrics of one class of this many images of the config's size "
    "(unimmad_jax.metrics.device_pixel_metrics), e.g. 3700, the largest class of the unified splits.",
)
flags.DEFINE_integer(
    "metrics-regions", 2**14, "With --metrics-images: the class's ground-truth regions on one device, at most."
)
flags.DEFINE_integer(
    "metrics-anomalous-pixels", 2**21, "With --metrics-images: the class's anomalous pixels on one device, at most."
)
FLAGS = flags.FLAGS

DEFAULT_PER_DEVICE_BATCH = 8


class Chip(NamedTuple):
    """Public per-chip figures (Google Cloud TPU documentation): dense bf16 FLOP/s, HBM bandwidth and capacity."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: int


CHIPS = {  # by the device kind libtpu reports
    "TPU v4": Chip("v4", 275e12, 1228e9, 32 * 2**30),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 16 * 2**30),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 95 * 2**30),
    "TPU v6 lite": Chip("v6e", 918e12, 1640e9, 32 * 2**30),
}


def report(
    config, mode: str, topology: str, chip_config: str | None, global_batch: int, top: int, hlo_path: str | None = None
) -> dict:
    import jax

    topo = tpu_topology(topology, chip_config)
    devices = len(topo.devices)
    if global_batch % devices:
        raise app.UsageError(f"--global-batch={global_batch} must be a multiple of the {devices} devices of {topology}")
    kind = topo.devices[0].device_kind
    chip = CHIPS.get(kind)
    mesh = topology_mesh(topo)
    start = time.perf_counter()
    compiled, error = compile_step(config, mode, mesh, global_batch)
    result = {
        **step_description(config, mode, topology, kind, devices, global_batch),
        "chip_config": chip_config,
        "jax": jax.__version__,
        "compile_s": round(time.perf_counter() - start, 1),
        "fits": compiled is not None,
    }
    if compiled is None:
        return {**result, "error": error}
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    flops, traffic = float(cost["flops"]), float(cost["bytes accessed"])
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    result.update(
        {
            "peak_memory_bytes_per_device": memory.peak_memory_in_bytes,
            "argument_bytes_per_device": memory.argument_size_in_bytes,
            "output_bytes_per_device": memory.output_size_in_bytes,
            "alias_bytes_per_device": memory.alias_size_in_bytes,
            "code_bytes_per_device": memory.generated_code_size_in_bytes,
            "flops_per_device": flops,
            "bytes_accessed_per_device": traffic,
            "flops_per_image": flops * devices / global_batch,
            "bytes_accessed_per_image": traffic * devices / global_batch,
            "arithmetic_intensity": flops / traffic,
            **hlo_summary(hlo, top),
        }
    )
    # XLA's bytes accessed count on-chip memory too.  HBM's share: what the instructions' layouts place in
    # HBM, plus whatever of XLA's count the instructions do not account for, as if all of it were HBM.
    hbm = result["instruction_hbm_bytes"] + max(0.0, traffic - result["instruction_bytes"])
    result.update({"hbm_bytes_per_device": hbm, "hbm_bytes_per_image": hbm * devices / global_batch})
    if chip is not None:
        result["chip"] = {
            "name": chip.name,
            "bf16_flops_per_s": chip.bf16_flops,
            "hbm_bytes_per_s": chip.hbm_bytes_per_s,
            "hbm_bytes": chip.hbm_bytes,
        }
        result["roofline"] = roofline(flops, traffic, chip.bf16_flops, chip.hbm_bytes_per_s, global_batch / devices)
        result["roofline_hbm"] = roofline(flops, hbm, chip.bf16_flops, chip.hbm_bytes_per_s, global_batch / devices)
        result["fits"] = memory.peak_memory_in_bytes <= chip.hbm_bytes
    return result


def find_max_batch(config, mode, topology, chip_config, first: dict) -> tuple[int, list[dict]]:
    """The largest per-device batch whose step fits, searched from the batch of the `first` report
    (already compiled): each try is a full compile, so the next is predicted from the peaks so far
    (`next_batch`), starting from the state alone (the arguments) at batch 0."""
    keys = ("batch_per_device", "fits", "peak_memory_bytes_per_device", "bytes_accessed_per_device", "error")
    tried = [{k: first.get(k) for k in keys}]
    if "chip" not in first:
        raise app.UsageError(f"--find-max-batch needs the HBM of {first['device_kind']}, which CHIPS does not list")
    hbm = first["chip"]["hbm_bytes"]
    state_bytes = first.get("argument_bytes_per_device")

    def record(devices_report: dict) -> None:
        peak = devices_report.get("peak_memory_bytes_per_device") or compiler_peak(
            devices_report.get("error"), state_bytes or 0
        )
        if peak is not None:
            peaks[devices_report["batch_per_device"]] = peak

    peaks = {0: state_bytes} if state_bytes else {}
    record(first)
    low, high = (first["batch_per_device"], None) if first["fits"] else (0, first["batch_per_device"])
    while high is None or high - low > 1:
        per_device = next_batch(low, high, peaks, hbm)
        devices_report = report(config, mode, topology, chip_config, per_device * first["devices"], top=0)
        tried.append({k: devices_report.get(k) for k in keys})
        record(devices_report)
        if "error" in devices_report:  # over the HBM, or a compiler error: the first line says which
            verdict = "does not compile: " + devices_report["error"].strip().splitlines()[0][:300]
        else:
            peak = devices_report["peak_memory_bytes_per_device"] / 2**30
            verdict = f"peak {peak:.2f} GiB, {'fits' if devices_report['fits'] else 'over the chip HBM'}"
        print(f"  {per_device} per device: {verdict}", flush=True)
        low, high = (per_device, high) if devices_report["fits"] else (low, per_device)
    return low, tried


def metrics_report(
    config, topology: str, chip_config: str | None, images: int, regions: int, anomalous_pixels: int
) -> dict:
    """Compile the pixel metrics of one class of `images` maps, split over the topology's devices as the
    evaluation leaves them (padded to a multiple of the devices), for the HBM and time they take."""
    import jax
    import jax.numpy as jnp

    from unimmad_jax import metrics, sharding

    topo = tpu_topology(topology, chip_config)
    mesh = topology_mesh(topo)
    devices = len(topo.devices)
    rows = -(-images // devices) * devices
    size = config.image_size
    split, replicated = sharding.batch_split(mesh), sharding.replicated(mesh)
    region_ids, _ = metrics.region_ids_per_image(np.zeros((1, size, size), bool))
    arguments = (
        [jax.ShapeDtypeStruct((rows, size, size), jnp.float32, sharding=split)],
        [jax.ShapeDtypeStruct((rows, size, size), region_ids.dtype, sharding=split)],
        [jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split)],
        [jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=split)],
        jax.ShapeDtypeStruct((metrics.AUPRO_NUM_THRESHOLDS,), jnp.int32, sharding=replicated),
    )
    region_slots = 1 << (regions - 1).bit_length()
    # A device holds no more anomalous pixels than pixels.
    anomalous_slots = 1 << (min(anomalous_pixels, rows // devices * size * size) - 1).bit_length()
    start = time.perf_counter()
    try:
        compiled = (
            metrics.device_pixel_metrics.trace(
                *arguments, mesh=mesh, anomalous_slots=anomalous_slots, region_slots=region_slots
            )
            .lower()
            .compile()
        )
    except jax.errors.JaxRuntimeError as error:
        return {"images": images, "rows": rows, "image_size": size, "fits": False, "error": str(error)}
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    chip = CHIPS.get(topo.devices[0].device_kind)
    result = {
        "images": images,
        "rows": rows,
        "image_size": size,
        "region_slots": region_slots,
        "anomalous_slots": anomalous_slots,
        "compile_s": round(time.perf_counter() - start, 1),
        "peak_memory_bytes_per_device": memory.peak_memory_in_bytes,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "flops_per_device": float(cost["flops"]),
        "bytes_accessed_per_device": float(cost["bytes accessed"]),
        "fits": chip is None or memory.peak_memory_in_bytes <= chip.hbm_bytes,
    }
    if chip is not None:
        result["memory_bound_s"] = result["bytes_accessed_per_device"] / chip.hbm_bytes_per_s
    return result


def print_metrics_report(result: dict) -> None:
    gib = 2**30
    print(f"pixel metrics of one class of {result['images']} images at {result['image_size']} px:", end=" ")
    if "error" in result:
        print(f"does NOT compile/fit: {result['error'][:2000]}")
        return
    print(
        f"peak HBM per device {result['peak_memory_bytes_per_device'] / gib:.2f} GiB (arguments "
        f"{result['argument_bytes_per_device'] / gib:.2f}){'' if result['fits'] else '  -- over the chip HBM'}, "
        f"{result['bytes_accessed_per_device'] / 1e9:.1f} GB accessed per device"
        + (f" (>= {result['memory_bound_s']:.2f} s at HBM bandwidth)" if "memory_bound_s" in result else "")
        + f", compiled in {result['compile_s']} s"
    )


def print_report(result: dict) -> None:
    gib = 2**30
    print(
        f"{result['mode']} step, {result['topology']} ({result['devices']} x {result['device_kind']}), "
        f"global batch {result['global_batch']} ({result['batch_per_device']} per device), "
        f"conv_impl={result['conv_impl']}, dtype={result['dtype']}, fsdp={result['fsdp']}, "
        f"pack_pairs={result['pack_pairs']}, "
        f"compiled in {result['compile_s']} s"
    )
    if "error" in result:
        print(f"does NOT compile/fit: {result['error'][:2000]}")
        return
    print(
        f"peak HBM per device {result['peak_memory_bytes_per_device'] / gib:.2f} GiB (arguments "
        f"{result['argument_bytes_per_device'] / gib:.2f}, outputs {result['output_bytes_per_device'] / gib:.2f}, "
        f"aliased {result['alias_bytes_per_device'] / gib:.2f}, code {result['code_bytes_per_device'] / 2**20:.1f} MiB)"
        f"{'' if result['fits'] else '  -- over the chip HBM'}"
    )
    print(
        f"per device: {result['flops_per_device'] / 1e12:.3f} TFLOP, "
        f"{result['bytes_accessed_per_device'] / 1e9:.2f} GB accessed; "
        f"per image {result['flops_per_image'] / 1e9:.1f} GFLOP, {result['bytes_accessed_per_image'] / 1e9:.2f} GB; "
        f"{result['arithmetic_intensity']:.0f} FLOP/byte; in HBM at most "
        f"{result['hbm_bytes_per_device'] / 1e9:.2f} GB, {result['hbm_bytes_per_image'] / 1e9:.2f} GB an image"
    )
    if "roofline" in result:
        chip = result["chip"]
        print(
            f"roofline on {chip['name']} ({chip['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s bf16, "
            f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM):"
        )
        for key, traffic in (("roofline", "all bytes accessed"), ("roofline_hbm", "HBM bytes")):
            roof = result[key]
            print(
                f"  by {traffic}: compute {roof['compute_s'] * 1e3:.1f} ms, memory {roof['memory_s'] * 1e3:.1f} ms "
                f"-> >= {roof['step_s'] * 1e3:.1f} ms a step ({roof['bound']}-bound), "
                f"<= {roof['images_per_s_per_device']:.0f} images/s per device"
            )
    print_hlo_summary(result)


def main(argv) -> int:
    del argv
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/unified.py")
    accelerator_forms(config)
    topology, chip_config, mode = FLAGS.topology, FLAGS["chip-config"].value, FLAGS.mode
    global_batch = FLAGS["global-batch"].value
    if global_batch is None:
        global_batch = DEFAULT_PER_DEVICE_BATCH * len(tpu_topology(topology, chip_config).devices)
    result = report(config, mode, topology, chip_config, global_batch, FLAGS.top, FLAGS.hlo)
    print_report(result)
    metrics_images = FLAGS["metrics-images"].value
    if metrics_images:
        if mode != "eval":
            raise app.UsageError("--metrics-images compiles the evaluation's metrics: it needs --mode=eval")
        result["metrics"] = metrics_report(
            config,
            topology,
            chip_config,
            metrics_images,
            FLAGS["metrics-regions"].value,
            FLAGS["metrics-anomalous-pixels"].value,
        )
        print_metrics_report(result["metrics"])
    if FLAGS["find-max-batch"].value:
        print("largest batch per device that fits:", flush=True)
        result["max_batch_per_device"], result["max_batch_tries"] = find_max_batch(
            config, mode, topology, chip_config, result
        )
        print(f"largest batch per device: {result['max_batch_per_device']}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["fits"] and result.get("metrics", {}).get("fits", True) else 1


if __name__ == "__main__":
    sys.exit(app.run(main))
