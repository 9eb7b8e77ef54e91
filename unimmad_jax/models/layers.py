"""Building blocks with PyTorch's numerics (docs/model.md#conventions).

Several layers come in two forms (`CONV_IMPLS`) that take the same parameters and agree to rounding
(docs/performance.md): the standard XLA forms that the TPU and GPU compilers are built for ("native"), and
forms that XLA runs faster on a CPU ("cpu": matrix products per tap, shifted products, a per-channel
reduction), each named after how it computes.  `layer_forms` picks one form of each, once, with the compute
dtype (`ModelConfig.dtype`: float32, bfloat16, or float64 for parity checks; parameters stay float32; `None`
follows the inputs and parameters) bound: the model's modules are handed these constructors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from unimmad_jax.sharding import DATA_AXIS

Dtype = Any
ModuleDef = Callable[..., nn.Module]
"""A constructor of a module: a class, or a function or `functools.partial` returning one."""
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


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
    dtype: Dtype = None,
    name: str | None = None,
) -> nn.Module:
    """A PyTorch `Conv2d`: symmetric explicit padding (default k // 2), no bias unless asked."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        name=name,
    )


class PointwiseConv(nn.Module):
    """A 1x1 `Conv2d` (kernel `[1, 1, in, out]`) as a matrix product over channels.

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


def conv_pointwise_as_matmul(
    features: int, kernel: int, *, stride: int = 1, padding: int | None = None, **options
) -> nn.Module:
    """`conv`'s CPU form: unpadded 1x1 kernels as a `PointwiseConv`; `options`: `use_bias`, `dtype`, `name`."""
    if kernel == 1 and not padding:
        return PointwiseConv(features, stride, **options)
    return conv(features, kernel, stride=stride, padding=padding, **options)


class ConvTranspose(nn.Module):
    """PyTorch's `ConvTranspose2d` (scatter semantics) when `kernel - 2 * padding == stride`: out = stride * in.

    The kernel is stored `[kh, kw, out, in]`: PyTorch's `[in, out, kh, kw]` transposed by (2, 3, 1, 0),
    the same permutation as a plain convolution's weight.  This form convolves the input dilated by the
    stride (`lhs_dilation`) with the spatially flipped kernel.
    """

    features: int
    kernel: int
    stride: int
    padding: int = 0
    use_bias: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel, self.stride, self.padding
        if k - 2 * p != s:
            raise ValueError(f"ConvTranspose(kernel={k}, stride={s}, padding={p}) does not upsample by exactly {s}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = self.transposed_conv(x, kernel, s, p)
        return y if bias is None else y + bias

    @staticmethod
    def transposed_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        k, s, p = kernel.shape[0], stride, padding
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        return conv_nhwc(x, flipped, padding=((k - 1 - p, k - 1 - p),) * 2, lhs_dilation=(s, s))


class PhaseConvTranspose(ConvTranspose):
    """`ConvTranspose`'s CPU form: each tap is one matrix product of a shifted input, added into its
    output phase (docs/performance.md#transposed-convolutions)."""

    @staticmethod
    def transposed_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        k, s, p = kernel.shape[0], stride, padding
        features = kernel.shape[2]
        batch, height, width, _ = x.shape
        offsets = [(r + p - tap) // s for tap in range(k) for r in [(tap - p) % s]]
        margin = max(abs(o) for o in offsets)
        padded = jnp.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
        # Taps by `split`: its gradient is one concatenation (docs/performance.md#kernel-taps-by-split).
        taps = jnp.split(kernel.reshape(k * k, features, -1), k * k)
        phases = {}
        for tap, tap_kernel in enumerate(taps):
            ky, kx = divmod(tap, k)
            dy, dx = offsets[ky] + margin, offsets[kx] + margin
            shifted = padded[:, dy : dy + height, dx : dx + width]
            phase = ((ky - p) % s, (kx - p) % s)
            term = jnp.einsum("bhwi,oi->bhwo", shifted, tap_kernel[0])
            phases[phase] = phases[phase] + term if phase in phases else term
        grid = jnp.stack([jnp.stack([phases[ry, rx] for rx in range(s)], axis=3) for ry in range(s)], axis=2)
        return grid.reshape(batch, height * s, width * s, features)  # [b, h, ry, w, rx, o] -> [b, h*s, w*s, o]


class DepthwiseConv(nn.Module):
    """A PyTorch depthwise `Conv2d` (groups = channels, 'same' padding, no bias), kernel `[k, k, 1, C]`,
    as a grouped convolution, one group a channel."""

    kernel: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return self.depthwise_conv(x, kernel)

    @staticmethod
    def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        k = kernel.shape[0]
        return conv_nhwc(x, kernel, padding=((k // 2, k // 2),) * 2, feature_group_count=x.shape[-1])


class ShiftedDepthwiseConv(DepthwiseConv):
    """`DepthwiseConv`'s CPU form: a sum of k*k shifted, per-channel scaled copies of the input
    (docs/performance.md#depthwise-convolutions)."""

    @staticmethod
    @jax.checkpoint
    def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        """Rematerialised: the backward pass recomputes the shifted copies from the inputs."""
        k = kernel.shape[0]
        pad = k // 2
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return sum(
            padded[:, dy : dy + height, dx : dx + width] * kernel[dy, dx, 0] for dy in range(k) for dx in range(k)
        )


def per_sample_conv(x: jax.Array, kernels: jax.Array) -> jax.Array:
    """Convolve sample b of `x [B, h, w, C]` with its own kernel `kernels[b] [k, k, C, O]` ('same' padding).

    One convolution with the samples folded into feature groups (what `vmap` of a convolution over
    samples gives); 1x1 kernels as one batched matrix product.  Traced under a mesh
    (`sharding.traced_on`) the convolution runs on each device's own samples: XLA's partitioner would
    gather the whole batch onto every device for it (docs/scale.md#per-pair-convolutions).  A symbolic
    sample count (`jax.export`) cannot be a feature group count: it takes the CPU form.
    """
    if jax.export.is_symbolic_dim(x.shape[0]):
        return shifted_per_sample_conv(x, kernels)
    k = kernels.shape[1]
    if k == 1:
        return jnp.einsum("bhwi,bio->bhwo", x, kernels[:, 0, 0])
    pad = k // 2

    def grouped_conv(x: jax.Array, kernels: jax.Array) -> jax.Array:
        return jax.vmap(lambda image, kernel: conv_nhwc(image[None], kernel, padding=((pad, pad),) * 2)[0])(x, kernels)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.shape.get(DATA_AXIS, 1) == 1:
        return grouped_conv(x, kernels)
    split = PartitionSpec(DATA_AXIS)
    return jax.shard_map(grouped_conv, mesh=mesh, in_specs=(split, split), out_specs=split)(x, kernels)


@jax.checkpoint
def shifted_per_sample_conv(x: jax.Array, kernels: jax.Array) -> jax.Array:
    """`per_sample_conv`'s CPU form: k*k shifted per-sample matrix products, rematerialised for the
    backward pass (docs/performance.md#per-pair-convolutions).
    """
    num_samples, k, _, channels, out_channels = kernels.shape
    pad = k // 2
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # Taps by `split`: its gradient is one concatenation (docs/performance.md#kernel-taps-by-split).
    taps = jnp.split(kernels.reshape(num_samples, k * k, channels, out_channels), k * k, axis=1)
    out = 0
    for tap, kernel in enumerate(taps):
        dy, dx = divmod(tap, k)
        out = out + jnp.einsum("bhwi,bio->bhwo", padded[:, dy : dy + height, dx : dx + width], kernel[:, 0])
    return out


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

    The variance is taken of the deviations (two passes), here by one reduction over a reshaped
    `[..., groups, channels per group]` array.
    """

    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        dtype = self.dtype or jnp.result_type(x, scale)
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        return self.group_norm(x.astype(stats_dtype), group_count(channels), scale, bias).astype(dtype)

    @staticmethod
    def group_norm(x: jax.Array, groups: int, scale: jax.Array, bias: jax.Array) -> jax.Array:
        """Normalise `x` (in the statistics' dtype) per sample and group; then scale and shift."""
        batch, height, width, channels = x.shape
        grouped = x.reshape(batch, height, width, groups, channels // groups)
        centred = grouped - jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
        inverse_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True) + 1e-5)
        normalised = (centred * inverse_std).reshape(x.shape)
        return normalised * scale.astype(x.dtype) + bias.astype(x.dtype)


class PerChannelGroupNorm(GroupNorm):
    """`GroupNorm`'s CPU form: reduced per channel first, then per group (docs/performance.md#groupnorm)."""

    @staticmethod
    def group_norm(x: jax.Array, groups: int, scale: jax.Array, bias: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        count = height * width * (channels // groups)

        def per_group_mean(values):
            sums = jnp.sum(values, axis=(1, 2)).reshape(batch, groups, -1).sum(axis=-1) / count
            return jnp.repeat(sums, channels // groups, axis=-1)[:, None, None, :]

        centred = x - per_group_mean(x)
        inverse_std = jax.lax.rsqrt(per_group_mean(jnp.square(centred)) + 1e-5)
        return centred * (inverse_std * scale.astype(x.dtype)) + bias.astype(x.dtype)


class NormAct(nn.Module):
    """`norm_act(C)`: GroupNorm (`norm`) then ReLU."""

    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(self.norm(name="norm")(x))


class ConvNormAct(nn.Module):
    """A bias-free convolution (`conv`) followed by `norm_act` (`norm`)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 1
    stride: int = 1
    padding: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(self.features, self.kernel, stride=self.stride, padding=self.padding, name="conv")(x)
        return nn.relu(self.norm(name="norm")(x))


@dataclasses.dataclass(frozen=True)
class LayerForms:
    """One form of every layer that has two, computing in `dtype`: what the model's parts are handed.

    Built by `layer_forms`; the parts hand their blocks the constructors they use.
    """

    dtype: Dtype
    """The compute dtype, also of the parts' own arithmetic (the C-MoE's experts, the input embedding)."""
    conv: ModuleDef
    """`conv(features, kernel, *, stride=1, padding=None, use_bias=False, name=None)`: a PyTorch `Conv2d`."""
    conv_transpose: ModuleDef
    """`conv_transpose(features, kernel, stride, padding=0, use_bias=False, name=None)`: see `ConvTranspose`."""
    depthwise_conv: ModuleDef
    """`depthwise_conv(kernel, name=None)`: see `DepthwiseConv`."""
    group_norm: ModuleDef
    """`group_norm(name=None)`: GN(C)."""
    batch_norm: ModuleDef
    """`batch_norm(train, name=None)`: PyTorch's `BatchNorm2d`."""
    per_sample_conv: Callable[[jax.Array, jax.Array], jax.Array]
    """`per_sample_conv(x, kernels)`: see `per_sample_conv`."""


def layer_forms(conv_impl: str, dtype: Dtype = None) -> LayerForms:
    """The layers in the forms `conv_impl` selects, computing in `dtype`: where the model picks its forms."""
    native = native_forms(conv_impl)
    return LayerForms(
        dtype=dtype,
        conv=functools.partial(conv if native else conv_pointwise_as_matmul, dtype=dtype),
        conv_transpose=functools.partial(ConvTranspose if native else PhaseConvTranspose, dtype=dtype),
        depthwise_conv=functools.partial(DepthwiseConv if native else ShiftedDepthwiseConv, dtype=dtype),
        group_norm=functools.partial(GroupNorm if native else PerChannelGroupNorm, dtype=dtype),
        batch_norm=functools.partial(batch_norm, dtype=dtype),
        per_sample_conv=per_sample_conv if native else shifted_per_sample_conv,
    )


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`F.normalize(x, dim=channels)`: x / max(|x|, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


gelu = functools.partial(nn.gelu, approximate=False)
"""The exact (erf) GELU of PyTorch's default."""
