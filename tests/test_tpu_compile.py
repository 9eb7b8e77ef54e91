"""The TPU compiler compiles the tiny model's training step for a v5e:2x4 slice on this machine, without a TPU.

`python -m experiments.compile.tpu_compile` runs libtpu's compiler ahead of time on shapes alone: the report's
memory, FLOPs and collectives come from the compiled TPU program.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu, the TPU compiler, is not installed (pip install "jax[tpu]==0.10.2")',
)


def compile_tiny(tmp_path, *flags: str) -> tuple[dict, str]:
    """`tpu_compile` of the tiny config for v5e:2x4 at a global batch of 16: its JSON report and its output."""
    report_path = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "experiments.compile.tpu_compile",
        "--config=configs/tiny.py",
        "--topology=v5e:2x4",
        "--global-batch=16",
        f"--json={report_path}",
        *flags,
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(report_path.read_text()), result.stdout


def test_tiny_train_step_compiles_for_v5e_2x4(tmp_path):
    report, _ = compile_tiny(tmp_path, "--config.model.conv_impl=auto")
    assert (report["topology"], report["devices"], report["device_kind"]) == ("v5e:2x4", 8, "TPU v5 lite")
    assert (report["global_batch"], report["batch_per_device"]) == (16, 2)
    assert report["fits"] and report["conv_impl"] == "native"  # "auto" means the TPU's forms
    assert report["pack_pairs"]  # the packed step, at the budget of the builders' declared classes
    assert 0 < report["peak_memory_bytes_per_device"] < 2**30
    assert report["argument_bytes_per_device"] > 0
    assert report["flops_per_device"] > 0 and report["bytes_accessed_per_device"] > 0
    assert report["collectives"]["all-reduce"]["count"] > 0  # the gradients are summed over the data axis
    assert report["roofline"]["step_s"] > 0
    # The TPU keeps some buffers in on-chip memory, so HBM sees less than all the bytes the instructions access.
    assert 0 < report["instruction_hbm_bytes"] < report["instruction_bytes"]
    assert report["roofline_hbm"]["memory_s"] <= report["roofline"]["memory_s"]
    assert report["top_layers"] and report["top_instructions"]


def test_tiny_eval_step_and_metrics_compile_for_v5e_2x4(tmp_path):
    report, stdout = compile_tiny(tmp_path, "--mode=eval", "--metrics-images=100")
    metrics = report["metrics"]
    assert (metrics["images"], metrics["rows"], metrics["image_size"]) == (100, 104, 64)  # padded to the 8 devices
    assert metrics["fits"] and 0 < metrics["peak_memory_bytes_per_device"] < 2**30
    # The maps (float32) and region ids (int16) come in split over the devices: each holds an eighth of them,
    # twice that as the TPU's tiles pad rows of 64 pixels to 128 lanes (at 256 px, exactly an eighth).
    assert metrics["argument_bytes_per_device"] <= 2 * 104 * 64 * 64 * (4 + 2) / 8 + 2**12
    assert "pixel metrics of one class of 100 images at 64 px" in stdout
