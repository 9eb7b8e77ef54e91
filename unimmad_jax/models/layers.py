"""Building blocks with PyTorch's numerics (docs/model.md#conventions).

Every module takes a compute `dtype` (the model passes `ModelConfig.dtype`: float32, bfloat16,
or float64 for parity checks); parameters stay float32.  `None` follows the inputs and parameters.

Convolutions and norms also take a `conv_impl` (`CONV_IMPLS`): "native" computes them in the
standard XLA forms that the TPU and GPU compilers are built for; "cpu" in forms that XLA runs
faster on a CPU (matrix products per tap, shifted products, a channel-first reduction); "auto"
picks by `jax.default_backend()`.  Both forms take the same parameters and agree to rounding
(docs/performance.md).
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


CONV_IMPLS = ("auto", "cpu", "native")


def native_forms(conv_impl: str) -> bool:
    """Whether `conv_impl` selects the standard XLA forms: "native", or "auto" on any backend but the CPU."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r} is not one of {CONV_IMPLS}")
    return conv_impl == "native" or (conv_impl == "auto" and jax.default_backend() != "cpu")


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1, padding=((0, 0), (0, 0)), **options) -> jax.Array:
    """`lax.conv_general_dilated` on channels-last inputs and `[kh, kw, in, out]` kernels."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **options
    )


def group_count(channels: int) -> int:
    """GN(C): the first of 32, 16, 8, 4, 2, 1 groups that divides C."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PointwiseConv(nn.Module):
    """The CPU form of a 1x1 `Conv2d` (kernel `[1, 1, in, out]`): a matrix product over channels.

    A stride keeps every stride-th pixel, as a 1x1 convolution does (docs/performance.md#pointwise-convolutions).
    """

    features: int
    stride: int = 1
    use_bias: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("bhwi,io->bhwo", x[:, :: self.stride, :: self.stride], kernel[0, 0])
        return y if bias is None else y + bias


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = False,
    dtype: Dtype = None,
    conv_impl: str = "auto",
    name: str | None = None,
) -> nn.Module:
    """A PyTorch `Conv2d`: symmetric explicit padding (default k // 2), no bias unless asked."""
    pad = kernel // 2 if padding is None else padding
    if kernel == 1 and pad == 0 and not native_forms(conv_impl):
        return PointwiseConv(features, stride, bias, dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        dtype=dtype,
        name=name,
    )


class ConvTranspose(nn.Module):
    """PyTorch's `ConvTranspose2d` (scatter semantics) when `kernel - 2 * padding == stride`: out = stride * in.

    The kernel is stored `[kh, kw, out, in]`: PyTorch's `[in, out, kh, kw]` transposed by (2, 3, 1, 0),
    the same permutation as a plain convolution's weight.

    Native form: the convolution of the input dilated by the stride (`lhs_dilation`) with the
    spatially flipped kernel.  CPU form: each tap is one matrix product of a shifted input, added
    into its output phase (docs/performance.md#transposed-convolutions).
    """

    features: int
    kernel: int
    stride: int
    padding: int = 0
    use_bias: bool = False
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel, self.stride, self.padding
        if k - 2 * p != s:
            raise ValueError(f"ConvTranspose(kernel={k}, stride={s}, padding={p}) does not upsample by exactly {s}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if native_forms(self.conv_impl):
            flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
            y = conv_nhwc(x, flipped, padding=((k - 1 - p, k - 1 - p),) * 2, lhs_dilation=(s, s))
            return y if bias is None else y + bias
        batch, height, width, _ = x.shape
        offsets = [(r + p - tap) // s for tap in range(k) for r in [(tap - p) % s]]
        margin = max(abs(o) for o in offsets)
        padded = jnp.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
        # Taps by `split`: its gradient is one concatenation (docs/performance.md#kernel-taps-by-split).
        taps = jnp.split(kernel.reshape(k * k, self.features, -1), k * k)
        phases = {}
        for tap, tap_kernel in enumerate(taps):
            ky, kx = divmod(tap, k)
            dy, dx = offsets[ky] + margin, offsets[kx] + margin
            shifted = padded[:, dy : dy + height, dx : dx + width]
            phase = ((ky - p) % s, (kx - p) % s)
            term = jnp.einsum("bhwi,oi->bhwo", shifted, tap_kernel[0])
            phases[phase] = phases[phase] + term if phase in phases else term
        grid = jnp.stack([jnp.stack([phases[ry, rx] for rx in range(s)], axis=3) for ry in range(s)], axis=2)
        y = grid.reshape(batch, height * s, width * s, self.features)  # [b, h, ry, w, rx, o] -> [b, h*s, w*s, o]
        return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
    """A PyTorch depthwise `Conv2d` (groups = channels, 'same' padding, no bias), kernel `[k, k, 1, C]`.

    Native form: a grouped convolution, one group a channel.  CPU form: a sum of k*k shifted,
    per-channel scaled copies of the input (docs/performance.md#depthwise-convolutions).
    """

    kernel: int
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if native_forms(self.conv_impl):
            return conv_nhwc(x, kernel, padding=((k // 2, k // 2),) * 2, feature_group_count=x.shape[-1])
        return depthwise_conv(x, kernel)


@jax.checkpoint
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`DepthwiseConv`'s CPU form; the backward pass recomputes the shifted copies from the inputs."""
    k = kernel.shape[0]
    pad = k // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sum(padded[:, dy : dy + height, dx : dx + width] * kernel[dy, dx, 0] for dy in range(k) for dx in range(k))


def conv_transpose(
    features: int,
    kernel: int,
    *,
    stride: int,
    padding: int = 0,
    bias: bool = False,
    dtype: Dtype = None,
    conv_impl: str = "auto",
    name: str | None = None,
) -> ConvTranspose:
    """A PyTorch `ConvTranspose2d` (see `ConvTranspose`)."""
    return ConvTranspose(features, kernel, stride, padding, use_bias=bias, dtype=dtype, conv_impl=conv_impl, name=name)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose running variance takes the unbiased batch variance, as PyTorch's does:
    x n / (n - 1), n = the elements reduced over (masked ones left out); normalising uses the biased one."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if self.use_running_average or self.is_initializing():
            return super().__call__(x, mask=mask)
        before = self.get_variable("batch_stats", "var")
        y = super().__call__(x, mask=mask)
        after = self.get_variable("batch_stats", "var")
        count = x.size // x.shape[-1] if mask is None else jnp.sum(jnp.broadcast_to(mask, x.shape), axis=(0, 1, 2))
        # after - momentum * before is (1 - momentum) times the biased variance: rescale that term by n / (n - 1).
        self.put_variable("batch_stats", "var", after + (after - self.momentum * before) / (count - 1))
        return y


def batch_norm(train: bool, *, dtype: Dtype = None, name: str | None = None) -> BatchNorm:
    """PyTorch `BatchNorm2d`: eps 1e-5, momentum 0.1 (Flax's 0.9), two-pass variance for float32 accuracy."""
    return BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


class GroupNorm(nn.Module):
    """GN(C): groups from `group_count`, eps 1e-5, affine; statistics in at least float32.

    The variance is taken of the deviations (two passes).  Native form: one reduction over a
    reshaped `[..., groups, channels per group]` array.  CPU form: reduced per channel first, then
    per group (docs/performance.md#groupnorm).
    """

    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        groups = group_count(channels)
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        dtype = self.dtype or jnp.result_type(x, scale)
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        x32 = x.astype(stats_dtype)
        if native_forms(self.conv_impl):
            grouped = x32.reshape(batch, height, width, groups, channels // groups)
            centred = grouped - jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
            inverse_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True) + 1e-5)
            normalised = (centred * inverse_std).reshape(x.shape)
            return (normalised * scale.astype(stats_dtype) + bias.astype(stats_dtype)).astype(dtype)

        count = height * width * (channels // groups)

        def per_group_mean(values):
            sums = jnp.sum(values, axis=(1, 2)).reshape(batch, groups, -1).sum(axis=-1) / count
            return jnp.repeat(sums, channels // groups, axis=-1)[:, None, None, :]

        centred = x32 - per_group_mean(x32)
        inverse_std = jax.lax.rsqrt(per_group_mean(jnp.square(centred)) + 1e-5)
        y = centred * (inverse_std * scale.astype(stats_dtype)) + bias.astype(stats_dtype)
        return y.astype(dtype)


class NormAct(nn.Module):
    """`norm_act(C)`: GroupNorm then ReLU."""

    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(GroupNorm(self.dtype, self.conv_impl, name="norm")(x))


class ConvNormAct(nn.Module):
    """A bias-free convolution followed by `norm_act`."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int | None = None
    dtype: Dtype = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = self.conv_impl
        x = conv(
            self.features,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dtype=self.dtype,
            conv_impl=impl,
            name="conv",
        )(x)
        return nn.relu(GroupNorm(self.dtype, impl, name="norm")(x))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`F.normalize(x, dim=channels)`: x / max(|x|, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


gelu = functools.partial(nn.gelu, approximate=False)
"""The exact (erf) GELU of PyTorch's default."""
