"""What several test modules use: the repository's paths, the tiny config and command-line runs.

`conftest.py` sets the device count and compilation cache before JAX starts; this module only
reads them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "data" / "parity"
"""The parity fixtures: cases and manifests (tests/data/parity/README.md)."""
COMPILATION_CACHE_ENV = "UNIMMAD_TEST_COMPILATION_CACHE"
"""Where conftest tells command-line runs of the tests to share its compilation cache."""
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
"""XLA flags of every test's compiles but the full-size parity runs': the tests' small models spend far more time
compiling than computing, and skipping LLVM's optimisations takes about a third off the compiles."""


def load_config(name: str):
    """`configs/<name>.py`'s config, as `--config=configs/<name>.py` gives it."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_model_config():
    """The model of `configs/tiny.py`: every part of the paper's model at a few channels."""
    from unimmad_jax.config import model_config

    return model_config(load_config("tiny"))


def subprocess_env(devices: int = 1, quick_compile: bool = True) -> dict[str, str]:
    """The environment of a command-line run on `devices` simulated CPU devices, sharing the compilation cache.

    `quick_compile=False` for runs that compute much (the full-size model in float64)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ[COMPILATION_CACHE_ENV]
    flags = [QUICK_COMPILE_FLAGS] if quick_compile else []
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def main_command(workdir, data_dir, *args, **fields) -> list[str]:
    """`python -m unimmad_jax.main --config=configs/tiny.py` on `workdir`, with `--config.<k>=<v>` for `fields`."""
    fields = {"data.data_dir": data_dir, **fields}
    return [
        sys.executable,
        "-m",
        "unimmad_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in fields.items()),
        *args,
    ]


def run_main(workdir, data_dir, *args, **fields) -> str:
    """`main_command`'s run on 1 device; returns its standard output after checking that it succeeded."""
    result = subprocess.run(
        main_command(workdir, data_dir, *args, **fields), cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def kill_when(command: list[str], path: Path, output: Path) -> str:
    """Run `command` and kill it (SIGKILL: nothing runs on exit) as soon as `path` exists; it must not end first.
    Returns what it printed, kept in `output` (unbuffered: a killed process flushes nothing)."""
    with output.open("w+") as f:
        process = subprocess.Popen(
            command, cwd=REPO, env={**subprocess_env(), "PYTHONUNBUFFERED": "1"}, stdout=f, stderr=subprocess.STDOUT
        )
        try:
            while not path.exists() and process.poll() is None:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
        assert process.returncode == -signal.SIGKILL, f"{command} ended before {path} appeared"
        f.seek(0)
        return f.read()


def sigterm_when(processes: list[subprocess.Popen], ready: Callable[[], bool], receivers: Sequence[int]) -> None:
    """Send SIGTERM, a preemption notice, to `processes[i]` for i in `receivers` as soon as `ready()`; every process
    must still be running then."""
    while not ready():
        ended = [p.args for p in processes if p.poll() is not None]
        assert not ended, f"{ended} ended before the preemption notice"
        time.sleep(0.05)
    for i in receivers:
        processes[i].send_signal(signal.SIGTERM)


def logged_step(workdir: Path, step: int) -> Callable[[], bool]:
    """Whether the run in `workdir` has logged global step `step` (or a later one) to its `metrics.jsonl`."""

    def ready() -> bool:
        path = workdir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return any(json.loads(line)["step"] >= step for line in lines if line.endswith("}"))

    return ready
