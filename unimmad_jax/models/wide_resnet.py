"""WideResNet-50-2 features up to layer3 (docs/model.md#prior-and-general-encoder).

torchvision's ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv. layer4 and
the classifier are never built: their result would be thrown away.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from unimmad_jax.models.layers import LayerForms, ModuleDef

EXPANSION = 4


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> `spatial` -> BN -> ReLU -> conv1x1 -> BN, plus the input; ReLU.

    `spatial(width, name)` is the block's spatial convolution: a 3x3 one, strided where the encoder
    downsamples, or the decoder's transposed 2x2/2.  `shortcut(features, name)`, when given, resamples
    the input as `spatial` does and projects it to the output's channels, followed by BN; its layers are
    named after the reference's `downsample` (encoder) or `upsample` (decoder), `shortcut_name`.
    """

    planes: int
    width: int
    conv: ModuleDef
    norm: ModuleDef
    spatial: ModuleDef
    shortcut: ModuleDef | None = None
    shortcut_name: str = "downsample"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * EXPANSION
        y = self.conv(self.width, 1, name="conv1")(x)
        y = nn.relu(self.norm(train, name="bn1")(y))
        y = self.spatial(self.width, name="conv2")(y)
        y = nn.relu(self.norm(train, name="bn2")(y))
        y = self.conv(out_features, 1, name="conv3")(y)
        y = self.norm(train, name="bn3")(y)
        if self.shortcut is not None:
            x = self.shortcut(out_features, name=f"{self.shortcut_name}_conv")(x)
            x = self.norm(train, name=f"{self.shortcut_name}_bn")(x)
        return nn.relu(y + x)


class WideResNetFeatures(nn.Module):
    """Stem and the first three stages; returns their outputs at strides 4, 8 and 16.

    `planes` and `blocks` are per stage; a bottleneck is `width_factor * planes` wide and
    outputs `4 * planes` channels (WRN-50-2: planes 64/128/256, blocks 3/4/6, factor 2).
    """

    forms: LayerForms
    planes: Sequence[int] = (64, 128, 256)
    blocks: Sequence[int] = (3, 4, 6)
    width_factor: int = 2
    stem_width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        conv, norm = self.forms.conv, self.forms.batch_norm
        x = conv(self.stem_width, 7, stride=2, padding=3, name="conv1")(x)
        x = nn.relu(norm(train, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for stage, (planes, blocks) in enumerate(zip(self.planes, self.blocks)):
            for block in range(blocks):
                first = block == 0
                stride = 2 if first and stage > 0 else 1
                x = Bottleneck(
                    planes,
                    self.width_factor * planes,
                    conv,
                    norm,
                    spatial=functools.partial(conv, kernel=3, stride=stride),
                    shortcut=functools.partial(conv, kernel=1, stride=stride) if first else None,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
            features.append(x)
        return features

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(EXPANSION * p for p in self.planes)
