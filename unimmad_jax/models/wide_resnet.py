"""WideResNet-50-2 features up to layer3 (docs/model.md#prior-and-general-encoder).

torchvision's ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv. layer4 and
the classifier are never built: their result would be thrown away.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from unimmad_jax.models.layers import Dtype, batch_norm, conv

EXPANSION = 4


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3/stride -> BN -> ReLU -> conv1x1 -> BN, plus the (projected) input; ReLU."""

    planes: int
    width: int
    stride: int = 1
    project: bool = False
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * EXPANSION
        y = conv(self.width, 1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv(self.width, 3, stride=self.stride, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv(out_features, 1, dtype=self.dtype, conv_impl=self.conv_impl, name="conv3")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
        if self.project:
            x = conv(
                out_features, 1, stride=self.stride, dtype=self.dtype, conv_impl=self.conv_impl, name="downsample_conv"
            )(x)
            x = batch_norm(train, dtype=self.dtype, name="downsample_bn")(x)
        return nn.relu(y + x)


class WideResNetFeatures(nn.Module):
    """Stem and the first three stages; returns their outputs at strides 4, 8 and 16.

    `planes` and `blocks` are per stage; a bottleneck is `width_factor * planes` wide and
    outputs `4 * planes` channels (WRN-50-2: planes 64/128/256, blocks 3/4/6, factor 2).
    """

    planes: Sequence[int] = (64, 128, 256)
    blocks: Sequence[int] = (3, 4, 6)
    width_factor: int = 2
    stem_width: int = 64
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        x = conv(self.stem_width, 7, stride=2, padding=3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for stage, (planes, blocks) in enumerate(zip(self.planes, self.blocks)):
            for block in range(blocks):
                first = block == 0
                x = Bottleneck(
                    planes,
                    self.width_factor * planes,
                    stride=2 if first and stage > 0 else 1,
                    project=first,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
            features.append(x)
        return features

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(EXPANSION * p for p in self.planes)
