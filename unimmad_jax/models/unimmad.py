"""The whole UniMMAD model: share image, general encoder, FCM/decoder, frozen prior, three C-MoEs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimmad_jax.models.cmoe import ROUTER_CONDITIONS, CrossMoE, Routing
from unimmad_jax.models.embedding import InputEmbedding
from unimmad_jax.models.fcm import FeatureCompressorDecoder
from unimmad_jax.models.layers import CONV_IMPLS, l2_normalize, layer_forms
from unimmad_jax.models.wide_resnet import EXPANSION, WideResNetFeatures
from unimmad_jax.packing import PairIndex, full_pairs, pair_images

COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
"""What the layers may compute in (docs/model.md#compute-dtype); parameters stay float32."""

IMAGE_SIZE_MULTIPLE = 32
"""The deepest level is at stride 32, and every level must tile it exactly."""

FROZEN = ("prior",)
"""Top-level parameter collections that training never updates (the prior generator)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Widths and depths of the model; the defaults are the paper's (docs/model.md#the-network)."""

    image_size: int = 256
    max_modalities: int = 4
    embedding_widths: tuple[int, ...] = (24, 48)
    planes: tuple[int, ...] = (64, 128, 256)
    blocks: tuple[int, ...] = (3, 4, 6)
    width_factor: int = 2
    stem_width: int = 64
    fcm_dim: int = 512
    moe_dim: int = 256
    base_num: int = 8
    router_num: int = 32
    top_k: int = 2
    moe_kernels: tuple[int, ...] = (1, 3, 5)
    dtype: str = "float32"
    """The compute dtype, one of `COMPUTE_DTYPES`."""
    conv_impl: str = "auto"
    """Layer forms (`layers.CONV_IMPLS`): "cpu", "native" (standard XLA convolutions, for TPU and GPU) or
    "auto" (by `jax.default_backend()`).  Both take the same parameters."""
    router_condition: str = "cross"
    """What the C-MoE routers see (`cmoe.ROUTER_CONDITIONS`): "cross", the general feature and the specific
    prior (the paper's model), or "specific", the prior only (the paper's routing ablation); same parameters."""

    def __post_init__(self):
        if self.image_size % IMAGE_SIZE_MULTIPLE:
            raise ValueError(
                f"model.image_size={self.image_size} is not a multiple of {IMAGE_SIZE_MULTIPLE}: "
                f"the model's levels sit at strides 4 to 32 and must tile the image"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"model.conv_impl={self.conv_impl!r} is not one of {CONV_IMPLS}")
        if self.router_condition not in ROUTER_CONDITIONS:
            raise ValueError(f"model.router_condition={self.router_condition!r} is not one of {ROUTER_CONDITIONS}")
        if not 1 <= self.top_k <= self.router_num:
            raise ValueError(f"model.top_k={self.top_k} must be between 1 and model.router_num={self.router_num}")

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> ModelConfig:
        """Build from a config section (e.g. `config.model`), naming unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()})

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Channels of the three levels (WRN-50-2: 256, 512, 1024)."""
        return tuple(EXPANSION * p for p in self.planes)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class ModelOutput(NamedTuple):
    """Per level l: `prior[l]`, `decompressed[l]` `[P, h, w, D]` for the P pairs of `pairs` (`packing.PairIndex`).

    `pair_mask [P]` marks valid pairs; `moe_loss [levels]` is each C-MoE's load-balance loss;
    `routing[l][branch]` the routers' decisions.
    """

    prior: list[jax.Array]
    decompressed: list[jax.Array]
    pair_mask: jax.Array
    moe_loss: jax.Array
    routing: list[list[Routing]]
    pairs: PairIndex


def share_image(specific_images: jax.Array, max_modalities: int) -> jax.Array:
    """The reference's `img`: slot m in channels 3m..3m+2, zero-padded to `3 * max_modalities` channels."""
    batch, slots, height, width, channels = specific_images.shape
    stacked = specific_images.transpose(0, 2, 3, 1, 4).reshape(batch, height, width, slots * channels)
    return jnp.pad(stacked, ((0, 0), (0, 0), (0, 0), (0, (max_modalities - slots) * channels)))


class UniMMAD(nn.Module):
    """`specific_images [B, S, H, W, 3]` and `modality_mask [B, S]` (S <= max_modalities) -> `ModelOutput`.

    `pairs` (`unimmad_jax.packing`) are the (sample, slot) pairs the prior and the C-MoEs compute, the
    valid ones of `modality_mask`; None computes every slot of every sample (`packing.full_pairs`).
    Both give the same valid outputs, statistics and losses.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        # The one place the layer forms are chosen.
        forms = layer_forms(cfg.conv_impl, cfg.compute_dtype)
        wrn = dict(planes=cfg.planes, blocks=cfg.blocks, width_factor=cfg.width_factor, stem_width=cfg.stem_width)
        self.embedding = InputEmbedding(cfg.image_size, forms, 3 * cfg.max_modalities, cfg.embedding_widths)
        self.encoder = WideResNetFeatures(forms, **wrn)
        self.fcm = FeatureCompressorDecoder(forms, cfg.planes, cfg.blocks, cfg.width_factor, cfg.fcm_dim)
        self.prior = WideResNetFeatures(forms, **wrn)
        self.cmoes = [
            CrossMoE(
                dim,
                forms,
                cfg.moe_dim,
                cfg.base_num,
                cfg.router_num,
                cfg.top_k,
                cfg.moe_kernels,
                router_condition=cfg.router_condition,
                name=f"cmoe{level}",
            )
            for level, dim in enumerate(cfg.feature_dims)
        ]

    def __call__(
        self, specific_images: jax.Array, modality_mask: jax.Array, train: bool, pairs: PairIndex | None = None
    ) -> ModelOutput:
        cfg = self.config
        _, slots, height, width, _ = specific_images.shape
        if slots > cfg.max_modalities or (height, width) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images {specific_images.shape[1:]} do not fit a model of image_size "
                f"{cfg.image_size} with at most {cfg.max_modalities} modalities"
            )
        # Padded slots are zero in the share image whatever the batch holds there.
        specific_images = jnp.where(modality_mask[:, :, None, None, None], specific_images, 0).astype(cfg.compute_dtype)

        embedded = self.embedding(share_image(specific_images, cfg.max_modalities), train)
        general = self.fcm(self.encoder(embedded, train), train)
        # The prior generator is frozen: eval-mode BN, and no gradient flows into it.
        pairs = full_pairs(modality_mask) if pairs is None else pairs
        prior = self.prior(pair_images(specific_images, pairs), train=False)
        prior = [l2_normalize(jax.lax.stop_gradient(f)) for f in prior]

        decompressed, moe_loss, routing = [], [], []
        for cmoe, g, u in zip(self.cmoes, general, prior):
            y, loss, level_routing = cmoe(l2_normalize(g), u, pairs, train)
            decompressed.append(y)
            moe_loss.append(loss)
            routing.append(level_routing)
        return ModelOutput(prior, decompressed, pairs.mask, jnp.stack(moe_loss), routing, pairs)

    def prior_statistics(self, images: jax.Array) -> list[jax.Array]:
        """The prior on `images [n, H, W, 3]` with batch statistics; apply with `mutable=["batch_stats"]`."""
        return self.prior(images, train=True)


def init_variables(model: UniMMAD, seed: int, slots: int = 1) -> dict:
    """Randomly initialised variables, in one compiled call.

    An `rbg` key compiles much faster than threefry's draws (docs/performance.md#initialisation).
    """
    size = model.config.image_size
    images = jnp.zeros((1, slots, size, size, 3), jnp.float32)
    mask = jnp.ones((1, slots), bool)
    init = jax.jit(lambda key, x, m: model.init(key, x, m, train=False))
    return init(jax.random.key(seed, impl="rbg"), images, mask)


def abstract_variables(cfg: ModelConfig, slots: int = 1) -> dict:
    """The shapes and dtypes of a model's variables, without computing anything."""
    images = jax.ShapeDtypeStruct((1, slots, cfg.image_size, cfg.image_size, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, slots), jnp.bool_)
    return jax.eval_shape(lambda x, m: UniMMAD(cfg).init(jax.random.key(0), x, m, train=False), images, mask)
