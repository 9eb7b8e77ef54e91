"""Shared fixtures: a tiny model config on the full model's code path, and the shared parity files."""
from __future__ import annotations

from pathlib import Path

import pytest

from unimmad_jax.models.unimmad import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"

TINY = ModelConfig(image_size=64, embedding_widths=(4, 8), planes=(4, 8, 16), blocks=(1, 2, 1), stem_width=8,
                   fcm_dim=24, moe_dim=8, base_num=2, router_num=4, top_k=2)
"""Every part of the paper's model at a few channels: runs in seconds on a CPU."""


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return TINY
