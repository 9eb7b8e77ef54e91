"""Building blocks with PyTorch's numerics (SPEC 2, "Norm and activation conventions").

Every module takes a compute `dtype`: `None` follows the inputs and parameters
(float32, or float64 under `jax_enable_x64` for the gradient parity checks),
`jnp.bfloat16` computes in bfloat16 while the parameters stay float32.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
BATCH_NORM_MOMENTUM = 0.9
"""Flax's weight of the old running statistics: PyTorch's momentum 0.1."""


def group_count(channels: int) -> int:
    """GN(C): the first of 32, 16, 8, 4, 2, 1 groups that divides C."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None,
         bias: bool = False, groups: int = 1, dtype: Dtype = None, name: str | None = None) -> nn.Conv:
    """A PyTorch `Conv2d`: symmetric explicit padding (default k // 2), no bias unless asked."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=bias, feature_group_count=groups, dtype=dtype, name=name)


def conv_transpose(features: int, kernel: int, *, stride: int, padding: int = 0, bias: bool = False,
                   dtype: Dtype = None, name: str | None = None) -> nn.ConvTranspose:
    """A PyTorch `ConvTranspose2d` (scatter semantics, output `(n - 1) * stride - 2 * padding + kernel`).

    With `transpose_kernel=True` the kernel is stored `[kh, kw, out, in]`: PyTorch's `[in, out, kh, kw]`
    transposed by (2, 3, 1, 0), the same permutation as a plain convolution's weight.
    """
    pad = kernel - 1 - padding
    return nn.ConvTranspose(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                            use_bias=bias, transpose_kernel=True, dtype=dtype, name=name)


def batch_norm(train: bool, *, dtype: Dtype = None, name: str | None = None) -> nn.BatchNorm:
    """PyTorch `BatchNorm2d`: eps 1e-5, momentum 0.1 (Flax's 0.9), two-pass variance for float32 accuracy."""
    return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5,
                        use_fast_variance=False,
                        dtype=dtype, name=name)


def group_norm(channels: int, *, dtype: Dtype = None, name: str | None = None) -> nn.GroupNorm:
    """GN(C) of SPEC 2: eps 1e-5, affine, groups from `group_count`."""
    return nn.GroupNorm(num_groups=group_count(channels), epsilon=1e-5, use_fast_variance=False,
                        dtype=dtype, name=name)


class NormAct(nn.Module):
    """`norm_act(C)`: GroupNorm then ReLU."""
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(group_norm(x.shape[-1], dtype=self.dtype, name="norm")(x))


class ConvNormAct(nn.Module):
    """A bias-free convolution followed by `norm_act`."""
    features: int
    kernel: int = 1
    stride: int = 1
    padding: int | None = None
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.features, self.kernel, stride=self.stride, padding=self.padding, dtype=self.dtype,
                 name="conv")(x)
        return nn.relu(group_norm(self.features, dtype=self.dtype, name="norm")(x))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`F.normalize(x, dim=channels)`: x / max(|x|, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


gelu = functools.partial(nn.gelu, approximate=False)
"""The exact (erf) GELU of PyTorch's default."""
