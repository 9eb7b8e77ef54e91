"""Training losses (docs/model.md#losses): focal decompression consistency and the annealed load-balance loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unimmad_jax.models.unimmad import ModelOutput
from unimmad_jax.packing import gather_pairs

WEIGHTINGS = ("batch_mean", "per_sample")
ANNEALINGS = ("reference", "paper")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`weighting`: "batch_mean" multiplies every pair's term by the batch mean of the loss weights (the
    reference), "per_sample" by its own sample's weight.  `moe_anneal`: "reference" is
    `max(1 - e / horizon, 0.001)`, "paper" is `(1 - e / horizon)^2`; the reference fixes horizon = 200.
    """

    weighting: str = "batch_mean"
    moe_anneal: str = "reference"
    moe_horizon: int = 200
    focal_gamma: float = 2.0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss.weighting={self.weighting!r} is not one of {WEIGHTINGS}")
        if self.moe_anneal not in ANNEALINGS:
            raise ValueError(f"loss.moe_anneal={self.moe_anneal!r} is not one of {ANNEALINGS}")
        if self.moe_horizon <= 0:
            raise ValueError(f"loss.moe_horizon={self.moe_horizon} must be positive")


def cosine_distance(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`1 - cos(a, b)` over the channel (last) axis, each norm clamped at `eps` as PyTorch does.

    Computed in at least float32: bfloat16 sums over hundreds of channels lose the small
    distances that make the maps and the loss.
    """
    a, b = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (a, b))
    norms = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return 1.0 - jnp.sum(a * b, axis=-1) / norms


def decompression_loss(output: ModelOutput, loss_weight: jax.Array, cfg: LossConfig) -> jax.Array:
    """`L_DeC = 3 * mean over (level, valid pair) of mean_pixels(d * sg(d)^gamma) * weight`."""
    if cfg.weighting == "batch_mean":
        pair_weight = jnp.full(output.pair_mask.shape, jnp.mean(loss_weight), loss_weight.dtype)
    else:
        pair_weight = gather_pairs(loss_weight, output.pairs)
    valid = output.pair_mask.astype(pair_weight.dtype)
    terms = []
    for prior, decompressed in zip(output.prior, output.decompressed):
        distance = cosine_distance(prior, decompressed)
        focal = distance * jax.lax.stop_gradient(distance) ** cfg.focal_gamma
        terms.append(jnp.mean(focal, axis=(1, 2)) * pair_weight)
    per_level = jnp.stack(terms)  # [levels, P]
    return len(terms) * jnp.sum(per_level * valid) / (len(terms) * jnp.maximum(jnp.sum(valid), 1.0))


def moe_weight(epoch: jax.Array, cfg: LossConfig, dtype=jnp.float32) -> jax.Array:
    """The annealing factor `a(epoch)` of the load-balance loss (epochs counted from 0)."""
    progress = 1.0 - jnp.asarray(epoch, dtype) / cfg.moe_horizon
    if cfg.moe_anneal == "reference":
        return jnp.maximum(progress, 0.001)
    return jnp.square(jnp.maximum(progress, 0.0))


def total_loss(
    output: ModelOutput, loss_weight: jax.Array, epoch: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`L = L_DeC + a(epoch) * mean over levels of the C-MoE losses`, and both terms."""
    cos = decompression_loss(output, loss_weight, cfg)
    moe_loss = output.moe_loss.astype(jnp.promote_types(output.moe_loss.dtype, jnp.float32))
    moe = moe_weight(epoch, cfg, moe_loss.dtype) * jnp.mean(moe_loss)
    return cos + moe, {"cos_loss": cos, "moe_loss": moe}
