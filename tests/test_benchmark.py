"""`python -m experiments.bench.benchmark` measures both steps of the tiny model and writes the promised keys."""

import json
import subprocess
import sys

from helpers import REPO, subprocess_env


def benchmark(mode: str, out, *flags: str) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench.benchmark",
            "--config=configs/tiny.py",
            "--batch-size=2",
            "--modalities=2",
            f"--mode={mode}",
            "--steps=1",
            f"--json={out}",
            *flags,
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_benchmark_writes_its_measurements(tmp_path):
    measured = {
        "infer": benchmark("infer", tmp_path / "infer.json"),
        "train": benchmark("train", tmp_path / "train.json", "--slots=3"),  # 2 of 3 slots valid, packed
    }
    assert measured["infer"]["slots"] == 2 and (measured["train"]["slots"], measured["train"]["packed"]) == (3, True)
    for mode, result in measured.items():
        assert result["mode"] == mode and result["image_size"] == 64 and result["device"].endswith("(cpu)")
        for key in ("images_per_s", "gflops_per_image", "peak_memory_bytes", "compile_s", "stepping_peak_rss_bytes"):
            assert result[key] > 0, (mode, key)
    # XLA's count: a training step (forward and backward) costs well over twice the inference step.
    assert measured["train"]["gflops_per_image"] > 2 * measured["infer"]["gflops_per_image"]
