"""Feature compression (FCM) and the reverse-distillation decoder (docs/model.md#fcm-and-decoder).

The general encoder's three levels are brought to stride 8, compressed by three
depthwise-separable bottlenecks (kernels 1, 3, 5) and an outer bottleneck to stride 32,
then decoded by a mirrored WideResNet back to the three levels.  Image sizes are
multiples of 32, so the reference's resizes between levels never apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimmad_jax.models.layers import ConvNormAct, DepthwiseConv, Dtype, NormAct, batch_norm, conv, conv_transpose
from unimmad_jax.models.wide_resnet import EXPANSION


class DownBlock(nn.Module):
    """`relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + conv1x1_s(x))`."""

    features: int
    stride: int
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv(self.features, 3, stride=self.stride, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
        return nn.relu(
            y
            + conv(self.features, 1, stride=self.stride, dtype=self.dtype, conv_impl=self.conv_impl, name="shortcut")(x)
        )


class UpBlock(nn.Module):
    """`relu(BN(conv3x3(relu(BN(convT2x2/2(x))))) + convT4x4/2(x))`, the shortcut with a bias."""

    features: int
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv_transpose(self.features, 2, stride=2, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv(self.features, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
        shortcut = conv_transpose(
            self.features,
            4,
            stride=2,
            padding=1,
            bias=True,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            name="shortcut",
        )(x)
        return nn.relu(y + shortcut)


class SeparableBranch(nn.Module):
    """Depthwise KxK, pointwise to `features`, `norm_act`."""

    kernel: int
    features: int
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DepthwiseConv(self.kernel, self.dtype, self.conv_impl, name="depthwise")(x)
        return ConvNormAct(self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="pointwise")(x)


class InnerBottleneck(nn.Module):
    """One separable branch per level, concatenated, then conv2x2/2 (with bias) and `norm_act`."""

    kernel: int
    features: int
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
        branch_features = self.features // len(levels)
        y = jnp.concatenate(
            [
                SeparableBranch(self.kernel, branch_features, self.dtype, self.conv_impl, name=f"level{i}")(x)
                for i, x in enumerate(levels)
            ],
            axis=-1,
        )
        y = conv(
            self.features,
            2,
            stride=2,
            padding=0,
            bias=True,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            name="post_conv",
        )(y)
        return NormAct(self.dtype, self.conv_impl, name="post")(y)


class DecoderBottleneck(nn.Module):
    """A mirrored WRN bottleneck; the first of a stage upsamples x2 with transposed 2x2 convolutions."""

    planes: int
    width: int
    upsample: bool = False
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * EXPANSION
        y = conv(self.width, 1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        if self.upsample:
            y = conv_transpose(self.width, 2, stride=2, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(y)
        else:
            y = conv(self.width, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv(out_features, 1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv3")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
        if self.upsample:
            x = conv_transpose(
                out_features, 2, stride=2, dtype=self.dtype, conv_impl=self.conv_impl, name="upsample_conv"
            )(x)
            x = batch_norm(train, dtype=self.dtype, name="upsample_bn")(x)
        return nn.relu(y + x)


class FeatureCompressorDecoder(nn.Module):
    """FCM + decoder + final 1x1 convs: encoder levels `[4p0 @ /4, 4p1 @ /8, 4p2 @ /16]` in, same shapes out.

    `planes`/`blocks`/`width_factor` are the encoder's; the decoder runs the stages in reverse
    plane order (WRN-50-2: 256 x 3 blocks, 128 x 4, 64 x 6). `embed_dim` is the FCM's width E.
    """

    planes: Sequence[int] = (64, 128, 256)
    blocks: Sequence[int] = (3, 4, 6)
    width_factor: int = 2
    embed_dim: int = 512
    bottleneck_kernels: Sequence[int] = (1, 3, 5)
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], train: bool) -> list[jax.Array]:
        x1, x2, x3 = levels
        d, impl = self.dtype, self.conv_impl
        aligned = [
            DownBlock(self.embed_dim, 2, d, impl, name="down_level0")(x1, train),
            DownBlock(self.embed_dim, 1, d, impl, name="down_level1")(x2, train),
            UpBlock(self.embed_dim, d, impl, name="up_level2")(x3, train),
        ]
        compressed = jnp.concatenate(
            [
                InnerBottleneck(k, self.embed_dim, d, impl, name=f"bottleneck_k{k}")(aligned)
                for k in self.bottleneck_kernels
            ],
            axis=-1,
        )
        y = ConvNormAct(self.embed_dim, dtype=d, conv_impl=impl, name="fuse")(compressed)
        y = ConvNormAct(
            2 * EXPANSION * self.planes[-1], kernel=2, stride=2, padding=0, dtype=d, conv_impl=impl, name="head"
        )(y)
        decoded = []
        for stage, (planes, blocks) in enumerate(zip(reversed(self.planes), self.blocks)):
            for block in range(blocks):
                y = DecoderBottleneck(
                    planes,
                    self.width_factor * planes,
                    upsample=block == 0,
                    dtype=d,
                    conv_impl=impl,
                    name=f"decoder{stage + 1}_{block}",
                )(y, train)
            decoded.append(y)
        decoded.reverse()
        return [conv(f.shape[-1], 1, dtype=d, conv_impl=impl, name=f"final{i}")(f) for i, f in enumerate(decoded)]
