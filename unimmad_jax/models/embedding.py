"""Input embedding: the share image plus a learned map, a small stem and a shortcut (docs/model.md#input-embedding)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimmad_jax.models.layers import LayerForms


class InputEmbedding(nn.Module):
    """`out = stem(img + P) + shortcut(img + P)`; 3 channels out, for the general encoder.

    `P` (`input_embedding`, `[H, W, channels]`, N(0, 0.02^2)) ties the model to one image size.
    """

    image_size: int
    forms: LayerForms
    channels: int = 12
    stem_widths: Sequence[int] = (24, 48)
    out_channels: int = 3

    @nn.compact
    def __call__(self, share_image: jax.Array, train: bool) -> jax.Array:
        conv, norm, dtype = self.forms.conv, self.forms.batch_norm, self.forms.dtype
        position = self.param(
            "input_embedding", nn.initializers.normal(0.02), (self.image_size, self.image_size, self.channels)
        )
        x = share_image + jnp.asarray(position, dtype or jnp.result_type(share_image, position))
        y = x
        for i, width in enumerate(self.stem_widths):
            y = conv(width, 3, use_bias=True, name=f"stem_conv{i}")(y)
            y = nn.relu(norm(train, name=f"stem_bn{i}")(y))
        y = conv(self.out_channels, 3, use_bias=True, name=f"stem_conv{len(self.stem_widths)}")(y)
        return y + conv(self.out_channels, 1, use_bias=True, name="shortcut")(x)
