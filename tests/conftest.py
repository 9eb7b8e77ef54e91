"""Shared fixtures: a tiny model config on the full model's code path, and the shared parity files.

Tests run with 8 simulated CPU devices (multi-device behaviour is tested in-process on
meshes of 1 and 8 of them) and one persistent compilation cache, which the command-line
runs of the tests share.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from unimmad_jax.models.unimmad import ModelConfig  # noqa: E402

COMPILATION_CACHE = tempfile.mkdtemp(prefix="unimmad_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"

TINY = ModelConfig(
    image_size=64,
    embedding_widths=(4, 8),
    planes=(4, 8, 16),
    blocks=(1, 2, 1),
    stem_width=8,
    fcm_dim=24,
    moe_dim=8,
    base_num=2,
    router_num=4,
    top_k=2,
)
"""Every part of the paper's model at a few channels: runs in seconds on a CPU."""


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return TINY


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a command-line run on `devices` simulated CPU devices, sharing the compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """The built-in synthetic dataset, prepared once per test session."""
    from unimmad_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("data")
    prepare("synthetic", data_dir)
    return data_dir


def load_config(name: str):
    """`configs/<name>.py`'s config, as `--config=configs/<name>.py` gives it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
