"""Feature compression (FCM) and the reverse-distillation decoder (docs/model.md#fcm-and-decoder).

The general encoder's three levels are brought to stride 8, compressed by three
depthwise-separable bottlenecks (kernels 1, 3, 5) and an outer bottleneck to stride 32,
then decoded by a mirrored WideResNet back to the three levels.  Image sizes are
multiples of 32, so the reference's resizes between levels never apply.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimmad_jax.models.layers import ConvNormAct, LayerForms, ModuleDef, NormAct
from unimmad_jax.models.wide_resnet import EXPANSION, Bottleneck


class DownBlock(nn.Module):
    """`relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + conv1x1_s(x))`."""

    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.conv(self.features, 3, stride=self.stride, name="conv1")(x)
        y = nn.relu(self.norm(train, name="bn1")(y))
        y = self.conv(self.features, 3, name="conv2")(y)
        y = self.norm(train, name="bn2")(y)
        return nn.relu(y + self.conv(self.features, 1, stride=self.stride, name="shortcut")(x))


class UpBlock(nn.Module):
    """`relu(BN(conv3x3(relu(BN(convT2x2/2(x))))) + convT4x4/2(x))`, the shortcut with a bias."""

    features: int
    conv: ModuleDef
    conv_transpose: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.conv_transpose(self.features, 2, stride=2, name="conv1")(x)
        y = nn.relu(self.norm(train, name="bn1")(y))
        y = self.conv(self.features, 3, name="conv2")(y)
        y = self.norm(train, name="bn2")(y)
        shortcut = self.conv_transpose(self.features, 4, stride=2, padding=1, use_bias=True, name="shortcut")
        return nn.relu(y + shortcut(x))


class SeparableBranch(nn.Module):
    """Depthwise KxK, pointwise to `features`, `norm_act`."""

    kernel: int
    features: int
    depthwise_conv: ModuleDef
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.depthwise_conv(self.kernel, name="depthwise")(x)
        return ConvNormAct(self.features, self.conv, self.norm, name="pointwise")(x)


class InnerBottleneck(nn.Module):
    """One separable branch per level, concatenated, then conv2x2/2 (with bias) and `norm_act`."""

    kernel: int
    features: int
    depthwise_conv: ModuleDef
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> jax.Array:
        branch = functools.partial(
            SeparableBranch, self.kernel, self.features // len(levels), self.depthwise_conv, self.conv, self.norm
        )
        y = jnp.concatenate([branch(name=f"level{i}")(x) for i, x in enumerate(levels)], axis=-1)
        y = self.conv(self.features, 2, stride=2, padding=0, use_bias=True, name="post_conv")(y)
        return NormAct(self.norm, name="post")(y)


class FeatureCompressorDecoder(nn.Module):
    """FCM + decoder + final 1x1 convs: encoder levels `[4p0 @ /4, 4p1 @ /8, 4p2 @ /16]` in, same shapes out.

    `planes`/`blocks`/`width_factor` are the encoder's; the decoder runs the stages in reverse
    plane order (WRN-50-2: 256 x 3 blocks, 128 x 4, 64 x 6), each stage's first bottleneck
    upsampling x2 with transposed 2x2 convolutions. `embed_dim` is the FCM's width E.
    """

    forms: LayerForms
    planes: Sequence[int] = (64, 128, 256)
    blocks: Sequence[int] = (3, 4, 6)
    width_factor: int = 2
    embed_dim: int = 512
    bottleneck_kernels: Sequence[int] = (1, 3, 5)

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], train: bool) -> list[jax.Array]:
        x1, x2, x3 = levels
        conv, bn, gn = self.forms.conv, self.forms.batch_norm, self.forms.group_norm
        aligned = [
            DownBlock(self.embed_dim, 2, conv, bn, name="down_level0")(x1, train),
            DownBlock(self.embed_dim, 1, conv, bn, name="down_level1")(x2, train),
            UpBlock(self.embed_dim, conv, self.forms.conv_transpose, bn, name="up_level2")(x3, train),
        ]
        depthwise = self.forms.depthwise_conv
        compressed = jnp.concatenate(
            [
                InnerBottleneck(k, self.embed_dim, depthwise, conv, gn, name=f"bottleneck_k{k}")(aligned)
                for k in self.bottleneck_kernels
            ],
            axis=-1,
        )
        y = ConvNormAct(self.embed_dim, conv, gn, name="fuse")(compressed)
        y = ConvNormAct(2 * EXPANSION * self.planes[-1], conv, gn, kernel=2, stride=2, padding=0, name="head")(y)
        upsample = functools.partial(self.forms.conv_transpose, kernel=2, stride=2)
        decoded = []
        for stage, (planes, blocks) in enumerate(zip(reversed(self.planes), self.blocks)):
            for block in range(blocks):
                first = block == 0
                y = Bottleneck(
                    planes,
                    self.width_factor * planes,
                    conv,
                    bn,
                    spatial=upsample if first else functools.partial(conv, kernel=3),
                    shortcut=upsample if first else None,
                    shortcut_name="upsample",
                    name=f"decoder{stage + 1}_{block}",
                )(y, train)
            decoded.append(y)
        decoded.reverse()
        return [conv(f.shape[-1], 1, name=f"final{i}")(f) for i, f in enumerate(decoded)]
