"""Compile the training (or evaluation) step for an NVIDIA H200 on this machine, without a GPU.

    pip install "jax[cuda12]==0.10.2"   # XLA's GPU compiler (5.5 GB of wheels)
    python -m experiments.compile.gpu_compile --config=configs/mvtec3d.py --config.model.dtype=bfloat16 --json=h200.json
    python -m experiments.compile.gpu_compile --config=configs/unified.py --mode=eval --topology=1x1x8 \\
        --global-batch=256

The step is the one `unimmad_jax.main` runs (`experiments.compile.report.lower_step`), traced from shapes alone
over a data mesh of the topology's GPUs and compiled ahead of time by XLA's GPU compiler for the
GPU that `--target-config` describes: by default an H200 SXM, from its published figures
(`H200_SXM`).  Nothing is autotuned.

The compile runs in a child process: a failed check in XLA aborts the process, and the report then
says so and quotes the check.  `--xla-flags` become the child's XLA_FLAGS (default: XLA's defaults).
Reported per GPU: peak memory, the cuDNN convolutions, cuBLAS GEMMs and Triton fusions of the
compiled HLO, the FLOPs of the unoptimised step (the CPU backend's cost analysis: the GPU compile
has none), the bytes its instructions read and write, and a roofline step time.

`model.conv_impl` "auto" means the accelerator's layer forms here; `--config.model.conv_impl=cpu`
compiles the CPU forms for comparison.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

# JAX runs on the CPU and compiles for the GPU through the topology: it must not look for a GPU.
os.environ["JAX_PLATFORMS"] = "cpu"

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.compile import report  # noqa: E402

H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s of an H200 SXM (NVIDIA's data sheet)
# An H200 SXM as XLA's GPU compiler needs it (GpuDeviceInfoProto fields): NVIDIA's data sheet (141 GB of
# HBM3e at 4.8 TB/s, 132 SMs, 1.98 GHz boost) and the CUDA limits of compute capability 9.0.
H200_SXM = {
    "core_count": 132,  # SMs
    "fpus_per_core": 128,  # FP32 cores per SM
    "clock_rate_ghz": 1.98,
    "device_memory_size": 141 * 2**30,
    "memory_bandwidth": 4_800_000_000_000,  # bytes/s
    "l2_cache_size": 50 * 2**20,
    "shared_memory_per_block": 48 * 2**10,
    "shared_memory_per_block_optin": 227 * 2**10,
    "shared_memory_per_core": 228 * 2**10,
    "registers_per_block_limit": 64 * 2**10,
    "registers_per_core_limit": 64 * 2**10,
    "threads_per_warp": 32,
    "threads_per_block_limit": 1024,
    "threads_per_core_limit": 2048,
    "thread_dim_limit_x": 1024,
    "thread_dim_limit_y": 1024,
    "thread_dim_limit_z": 64,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
}
H200_NAME = "NVIDIA H200 SXM"  # what the compiled devices' device_kind says
H200_COMPUTE_CAPABILITY = (9, 0)
CUDNN_VERSION = (9, 8, 0)  # the oldest that jax[cuda12] 0.10.2 accepts: it decides which fused convolutions exist

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=False)
flags.DEFINE_string(
    "target-config", None, "A file with the GPU as a GpuTargetConfigProto in text form (default: H200_SXM)."
)
flags.DEFINE_string("topology", "1x1x1", "slices x hosts x GPUs per host, e.g. 1x1x8.")
flags.DEFINE_integer("global-batch", 32, "Images per step over all GPUs.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "The training step or the evaluation (predict) step.")
flags.DEFINE_string("xla-flags", "", "XLA_FLAGS of the compile, e.g. --xla_gpu_enable_triton_gemm=false.")
flags.DEFINE_float("peak-flops", H200_BF16_FLOPS, "The GPU's dense bf16 FLOP/s, for the roofline.")
flags.DEFINE_string("json", None, "Write the report here.")
flags.DEFINE_integer("top", 12, "How many instructions and layers to list by bytes accessed.")
flags.DEFINE_string("hlo", None, "Write the compiled HLO text here.")
flags.DEFINE_string("compiled-report", None, "Internal: compile in this process and write its report here.")
FLAGS = flags.FLAGS

CHECK_FAILED = re.compile(r"^.*Check failed.*$", re.MULTILINE)


def target_field(target_config: str, name: str) -> float:
    """A number of the GPU description, e.g. device_memory_size or memory_bandwidth."""
    match = re.search(rf"^\s*{name}: ([\d.e+]+)\s*$", target_config, re.MULTILINE)
    if match is None:
        raise app.UsageError(f"--target-config has no {name}")
    return float(match.group(1))


def h200_target_config() -> str:
    """H200_SXM as the GpuTargetConfigProto text that `topologies.get_topology_desc` takes."""
    fields = "".join(f"  {name}: {value!r}\n" for name, value in H200_SXM.items())
    major, minor = H200_COMPUTE_CAPABILITY
    cudnn_major, cudnn_minor, cudnn_patch = CUDNN_VERSION
    return (
        f"gpu_device_info {{\n{fields}  cuda_compute_capability {{ major: {major} minor: {minor} "
        # sm_90a, as XLA compiles for a real Hopper GPU: its wgmma and TMA instructions for Triton's GEMMs
        "feature_extension: ACCELERATED_FEATURES }\n}\n"
        f'platform_name: "CUDA"\ndevice_description_str: "{H200_NAME}"\n'
        f"dnn_version_info {{ major: {cudnn_major} minor: {cudnn_minor} patch: {cudnn_patch} }}\n"
    )


def gpu_mesh(target_config: str, topology: str):
    from jax.experimental import topologies

    return report.topology_mesh(
        topologies.get_topology_desc(platform="cuda", target_config=target_config, topology=topology)
    )


def compiled_report(config, mode: str, target_config: str, topology: str, global_batch: int, top: int) -> dict:
    """Compile for the GPUs in this process (a failed check in XLA ends it) and report on the program."""
    mesh = gpu_mesh(target_config, topology)
    start = time.perf_counter()
    compiled, error = report.compile_step(config, mode, mesh, global_batch)
    result = {"compile_s": round(time.perf_counter() - start, 1), "compiled": compiled is not None}
    if compiled is None:
        return {**result, "error": error}
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    if FLAGS.hlo:
        with open(FLAGS.hlo, "w") as f:
            f.write(hlo)
    return {
        **result,
        "peak_memory_bytes_per_device": memory.peak_memory_in_bytes,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "alias_bytes_per_device": memory.alias_size_in_bytes,
        "bytes_accessed_per_device": sum(i["bytes"] for i in report.hlo_traffic(hlo)[0]),
        **report.kernel_counts(hlo),
        **report.hlo_summary(hlo, top),
    }


def unoptimised_flops(config, mode: str, global_batch: int) -> float:
    """FLOPs of the whole step before optimisation, counted by the CPU backend on a one-device mesh."""
    import jax
    import numpy as np

    from unimmad_jax.sharding import DATA_AXIS

    mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), (DATA_AXIS,))
    return float(report.lower_step(config, mode, mesh, global_batch).cost_analysis()["flops"])


def compile_in_child(xla_flags: str) -> dict:
    """This script again with --compiled-report: its report, or how it ended and the check that failed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "compiled.json")
        env = {**os.environ, "XLA_FLAGS": xla_flags}
        command = [sys.executable, "-m", __spec__.name, *sys.argv[1:], f"--compiled-report={path}"]
        start = time.perf_counter()
        child = subprocess.run(command, env=env, capture_output=True, text=True)
        if child.returncode == 0:
            with open(path) as f:
                return json.load(f)
    checks = CHECK_FAILED.findall(child.stderr)
    return {
        "compile_s": round(time.perf_counter() - start, 1),
        "compiled": False,
        "returncode": child.returncode,
        "error": checks[-1] if checks else child.stderr[-3000:],
    }


def print_report(result: dict) -> None:
    gib = 2**30
    print(
        f"{result['mode']} step, {result['devices']} x {result['device_kind']}, global batch "
        f"{result['global_batch']} ({result['batch_per_device']} per GPU), conv_impl={result['conv_impl']}, "
        f"dtype={result['dtype']}, fsdp={result['fsdp']}, XLA_FLAGS={result['xla_flags']!r}, "
        f"compile {result['compile_s']} s"
    )
    print(f"unoptimised step: {result['flops_per_device'] / 1e12:.3f} TFLOP per GPU")
    if not result["compiled"]:
        ended = f" (XLA ended the process, exit status {result['returncode']})" if "returncode" in result else ""
        print(f"does NOT compile{ended}: {result['error'][:3000]}")
        return
    print(
        f"peak memory per GPU {result['peak_memory_bytes_per_device'] / gib:.2f} GiB of "
        f"{result['device_memory_bytes'] / gib:.0f} (arguments {result['argument_bytes_per_device'] / gib:.2f}, "
        f"outputs {result['output_bytes_per_device'] / gib:.2f}, temporaries "
        f"{result['temp_bytes_per_device'] / gib:.2f}, aliased {result['alias_bytes_per_device'] / gib:.2f})"
    )
    print(
        f"kernels: {result['cudnn_convolutions']} cuDNN convolutions, {result['cublas_gemms']} cuBLAS GEMMs, "
        f"{result['triton_fusions']} Triton fusions; custom calls {result['custom_calls']}; "
        f"custom fusions {result['fusion_kinds']}"
    )
    roof = result["roofline"]
    print(
        f"{result['bytes_accessed_per_device'] / 1e9:.1f} GB accessed per GPU; roofline at "
        f"{roof['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, {roof['bytes_per_s'] / 1e12:.2f} TB/s: compute "
        f"{roof['compute_s'] * 1e3:.1f} ms, memory {roof['memory_s'] * 1e3:.1f} ms -> >= {roof['step_s'] * 1e3:.1f} ms "
        f"a step ({roof['bound']}-bound), <= {roof['images_per_s_per_device']:.0f} images/s per GPU"
    )
    report.print_hlo_summary(result)


def main(argv) -> int:
    del argv
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mvtec3d.py")
    report.accelerator_forms(config)
    if FLAGS["target-config"].value:
        with open(FLAGS["target-config"].value) as f:
            target_config = f.read()
    else:
        target_config = h200_target_config()
    mode, topology, global_batch = FLAGS.mode, FLAGS.topology, FLAGS["global-batch"].value
    if FLAGS["compiled-report"].value:
        result = compiled_report(config, mode, target_config, topology, global_batch, FLAGS.top)
        with open(FLAGS["compiled-report"].value, "w") as f:
            json.dump(result, f)
        return 0

    mesh = gpu_mesh(target_config, topology)
    devices = mesh.devices.size
    if global_batch % devices:
        raise app.UsageError(f"--global-batch={global_batch} must be a multiple of the {devices} GPUs of {topology}")
    flops = unoptimised_flops(config, mode, global_batch) / devices
    result = {
        **report.step_description(config, mode, topology, mesh.devices.flat[0].device_kind, devices, global_batch),
        "xla_flags": FLAGS["xla-flags"].value,
        "device_memory_bytes": int(target_field(target_config, "device_memory_size")),
        "flops_per_device": flops,
        **compile_in_child(FLAGS["xla-flags"].value),
    }
    if result["compiled"]:
        peak_flops, bandwidth = FLAGS["peak-flops"].value, target_field(target_config, "memory_bandwidth")
        result["roofline"] = {
            "bf16_flops_per_s": peak_flops,
            "bytes_per_s": bandwidth,
            **report.roofline(
                flops, result["bytes_accessed_per_device"], peak_flops, bandwidth, global_batch / devices
            ),
        }
        result["fits"] = result["peak_memory_bytes_per_device"] <= result["device_memory_bytes"]
    print_report(result)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["compiled"] and result["fits"] else 1


if __name__ == "__main__":
    sys.exit(app.run(main))
