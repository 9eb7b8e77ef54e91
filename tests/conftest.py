"""Session set-up: 8 simulated CPU devices, one compilation cache, the tiny model and the synthetic data.

Multi-device behaviour is tested in-process on meshes of 1 and 8 of the devices; the
command-line runs of the tests share the compilation cache (`helpers.subprocess_env`).
"""

from __future__ import annotations

import os

# CPU only: with libtpu installed (the TPU compiler, tests/test_tpu_compile.py) JAX would otherwise look for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from helpers import COMPILATION_CACHE_ENV, QUICK_COMPILE_FLAGS, tiny_model_config  # noqa: E402

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), QUICK_COMPILE_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from unimmad_jax.models.unimmad import ModelConfig  # noqa: E402

os.environ.setdefault(COMPILATION_CACHE_ENV, tempfile.mkdtemp(prefix="unimmad_jax_xla_cache_"))
jax.config.update("jax_compilation_cache_dir", os.environ[COMPILATION_CACHE_ENV])


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """The built-in synthetic dataset, prepared once per test session."""
    from unimmad_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("data")
    prepare("synthetic", data_dir)
    return data_dir


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, synthetic_data_dir) -> Path:
    """One uninterrupted run of the command line on 1 device: `configs/tiny.py`, 3 epochs of 12 steps."""
    from helpers import run_main

    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_main(workdir, synthetic_data_dir)
    return workdir


@pytest.fixture(scope="session")
def trained_predictions(trained_workdir, synthetic_data_dir) -> Path:
    """`--mode=predict` of `trained_workdir` on the synthetic test split, 5 overlays: its output folder."""
    from helpers import run_main

    run_main(
        trained_workdir,
        synthetic_data_dir,
        "--mode=predict",
        **{"predict.input": "synthetic:test", "predict.max_overlays": 5},
    )
    return trained_workdir / "predictions" / "synthetic_test"
