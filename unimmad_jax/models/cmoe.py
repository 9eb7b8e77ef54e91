"""Cross Mixture-of-Experts (docs/model.md#c-moe): router, MoE-in-MoE branches (MiMoE) and the C-MoE of one level.

The C-MoE computes the P pairs of a `packing.PairIndex`, grouped as the batch is split over the
devices (`unimmad_jax.packing`).  The per-sample parts run once per sample and are gathered to
the pairs; `pairs.mask` keeps padding pairs out of every statistic, loss and valid output.
Routing is dense (a `[P, R]` gate), and a branch runs one convolution per pair with its experts
(and possibly `post`) composed into one kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimmad_jax.models.layers import ConvNormAct, Dtype, LayerForms, ModuleDef, NormAct, gelu
from unimmad_jax.packing import PairIndex, gather_pairs

ROUTER_CONDITIONS = ("cross", "specific")
"""What the routers' condition sees: the general feature and the specific prior, or the prior only (an ablation)."""


class Routing(NamedTuple):
    """Router output for P pairs: logits and probabilities `[P, R]`, the top-K `[P, K]`, the dense gate `[P, R]`."""

    logits: jax.Array
    probs: jax.Array
    index: jax.Array
    score: jax.Array
    gate: jax.Array


class Router(nn.Module):
    """`softmax(Linear(stats))`, top-K renormalised (`s_j = p_j / (sum_K p + 1e-8)`) and scattered densely."""

    router_num: int
    top_k: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, stats: jax.Array) -> Routing:
        logits = nn.Dense(self.router_num, dtype=self.dtype, name="gate")(stats)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        top_probs, index = jax.lax.top_k(probs, self.top_k)
        score = top_probs / (jnp.sum(top_probs, axis=-1, keepdims=True) + 1e-8)
        gate = jnp.einsum("pk,pkr->pr", score, jax.nn.one_hot(index, self.router_num, dtype=score.dtype))
        return Routing(logits, probs, index, score, gate)


def balance_loss(routing: Routing, pair_mask: jax.Array) -> jax.Array:
    """Load-balance loss of one branch over the valid pairs: `cv^2` of the mean router probabilities + z-loss."""
    weights = pair_mask.astype(routing.probs.dtype)[:, None]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    importance = jnp.sum(routing.probs * weights, axis=0) / count
    mean = jnp.mean(importance)
    cv_squared = jnp.mean(jnp.square(importance - mean)) / (jnp.square(mean) + 1e-8)
    z_loss = 1e-4 * jnp.sum(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1)) * weights[:, 0]) / count
    return cv_squared + z_loss


def identity_kernel(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """A `[k, k, C, C]` delta kernel: the convolution it defines is the identity."""
    del key
    k, _, channels, _ = shape
    return jnp.zeros(shape, dtype).at[k // 2, k // 2].set(jnp.eye(channels, dtype=dtype))


def fold_post(pixels: int, k: int, channels: int, pairs: int) -> bool:
    """Whether folding `post` into the branch kernels costs fewer multiply-adds than applying it after.

    Folding wins on large maps; on small ones composing the kernels costs more than it saves
    (docs/performance.md#folding-post).  A symbolic pair count (`jax.export`) can be a single pair:
    it decides for one.
    """
    if jax.export.is_symbolic_dim(pairs):
        pairs = 1
    folded = pairs * pixels * k * k * channels**2 + (pairs + 1) * k * k * channels**3
    after = pairs * pixels * (k * k * channels * 2 * channels + 2 * channels**2)
    return folded <= after


def pair_conv(x: jax.Array, kernels: jax.Array, pairs: PairIndex, per_sample_conv: Callable) -> jax.Array:
    """`x [B, h, w, C]` per sample, `kernels [P, k, k, C, O]` per pair -> `[P, h, w, O]`.

    Each pair's sample's feature, convolved with the pair's own kernel by one `per_sample_conv`
    (`layers.per_sample_conv` or its CPU form) over the P pairs.
    """
    return per_sample_conv(gather_pairs(x, pairs), kernels)


class MiMoE(nn.Module):
    """One kernel-size branch: `pre`, router, leader experts over the shared base bank, fixed expert, `post`.

    `conv` and `norm` build `pre` and `post`'s `norm_act`; `per_sample_conv` convolves each pair with its kernel.
    """

    kernel: int
    embed_dim: int
    router_num: int
    top_k: int
    conv: ModuleDef
    norm: ModuleDef
    per_sample_conv: Callable[[jax.Array, jax.Array], jax.Array]
    dtype: Dtype = None

    @nn.compact
    def __call__(
        self, general_map: jax.Array, stats: jax.Array, base: jax.Array, pairs: PairIndex
    ) -> tuple[jax.Array, Routing]:
        """`general_map [B, h, w, C]` per sample, `stats [P, C]` per pair of `pairs`, `base [N, k, k, C, C]`."""
        c, k = self.embed_dim, self.kernel
        x = ConvNormAct(c, self.conv, self.norm, name="pre")(general_map)
        routing = Router(self.router_num, self.top_k, self.dtype, name="router")(stats)
        leader_logits = self.param("leader_logits", nn.initializers.normal(1.0), (self.router_num, base.shape[0], c))
        fixed = self.param("fixed_expert", identity_kernel, (k, k, c, c))
        post = self.param("post", nn.initializers.lecun_normal(), (2 * c, c))

        dtype = self.dtype or jnp.result_type(x, base)
        x, fixed, post = x.astype(dtype), fixed.astype(dtype), post.astype(dtype)
        mixing = jnp.einsum(
            "pr,rnc->pnc", routing.gate.astype(dtype), jax.nn.softmax(leader_logits, axis=1).astype(dtype)
        )
        routed = jnp.einsum("pnc,nhwic->phwic", mixing, base.astype(dtype))
        if fold_post(x.shape[1] * x.shape[2], k, c, routed.shape[0]):
            kernels = jnp.einsum("hwic,co->hwio", fixed, post[:c]) + jnp.einsum("phwic,co->phwio", routed, post[c:])
            y = pair_conv(x, kernels, pairs, self.per_sample_conv)
        else:
            kernels = jnp.concatenate([jnp.broadcast_to(fixed, routed.shape), routed], axis=-1)
            y = jnp.einsum("phwc,co->phwo", pair_conv(x, kernels, pairs, self.per_sample_conv), post)
        return NormAct(self.norm, name="post_norm")(y), routing


class PairConcatConv(nn.Module):
    """`conv_kxk(cat[each pair's sample's per-sample features, per-pair features])`, no bias.

    A convolution of a concatenation is the sum of each part's convolution, so the per-sample
    part runs once per sample and is gathered to its pairs.  With `pair_only` the per-sample part
    is left out, as if it were zero; the kernel keeps its shape, so the parameters are the same.
    """

    features: int
    kernel: int = 3
    dtype: Dtype = None
    pair_only: bool = False

    @nn.compact
    def __call__(self, per_sample: jax.Array, per_pair: jax.Array, pairs: PairIndex) -> jax.Array:
        split = per_sample.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel, self.kernel, split + per_pair.shape[-1], self.features),
        )
        per_sample, per_pair, kernel = nn.dtypes.promote_dtype(per_sample, per_pair, kernel, dtype=self.dtype)
        pad = self.kernel // 2

        def conv(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        sample_kernel, pair_kernel = jnp.split(kernel, [split], axis=2)
        if self.pair_only:
            return conv(per_pair, pair_kernel)
        return gather_pairs(conv(per_sample, sample_kernel), pairs) + conv(per_pair, pair_kernel)


class CrossMoE(nn.Module):
    """The C-MoE of one level: general feature `[B, h, w, D]` and the priors `[P, h, w, D]` of `pairs`
    -> `[P, h, w, D]`.

    Returns the decompressed pair features, the level's load-balance loss (summed over its
    branches) and each branch's routing.
    """

    features: int
    forms: LayerForms
    embed_dim: int = 256
    base_num: int = 8
    router_num: int = 32
    top_k: int = 2
    kernels: Sequence[int] = (1, 3, 5)
    router_condition: str = "cross"
    """One of `ROUTER_CONDITIONS`; "specific" keeps the general feature out of the condition only."""

    @nn.compact
    def __call__(
        self, general: jax.Array, prior: jax.Array, pairs: PairIndex, train: bool
    ) -> tuple[jax.Array, jax.Array, list[Routing]]:
        pair_mask = pairs.mask
        c, dtype = self.embed_dim, self.forms.dtype
        conv, norm = self.forms.conv, self.forms.group_norm
        conv_norm_act = functools.partial(ConvNormAct, conv=conv, norm=norm)
        # The reference's `key` and `query` projections (their parameter names stay).
        general_map = conv_norm_act(c, name="key")(general)
        prior_map = conv_norm_act(c, name="query")(prior)
        pair_only = self.router_condition == "specific"
        cond = PairConcatConv(c, dtype=dtype, pair_only=pair_only, name="cond_conv")(general_map, prior_map, pairs)
        cond = self.forms.batch_norm(train, name="cond_bn")(cond, mask=pair_mask[:, None, None, None])
        cond = NormAct(norm, name="cond_act")(gelu(cond))
        cond = conv_norm_act(c, name="cond_proj")(cond)
        stats = jnp.mean(cond, axis=(1, 2))

        outputs, routings = [], []
        for k in self.kernels:
            base = self.param(
                f"base_k{k}",
                nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=4, batch_axis=0),
                (self.base_num, k, k, c, c),
            )
            branch = MiMoE(
                k, c, self.router_num, self.top_k, conv, norm, self.forms.per_sample_conv, dtype, name=f"mimoe_k{k}"
            )
            out, routing = branch(general_map, stats, base, pairs)
            outputs.append(out)
            routings.append(routing)
        y = conv_norm_act(self.features, name="out")(jnp.concatenate(outputs, axis=-1))
        loss = sum(balance_loss(r, pair_mask) for r in routings)
        return y, loss, routings
