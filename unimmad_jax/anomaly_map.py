"""Anomaly maps and image scores (docs/model.md#anomaly-maps-and-image-score), per sample at any batch size.

Both resampling steps are linear and separable, so each is a pair of small matrices:
bilinear upsampling with `align_corners=True`, and the 15x15 (sigma 4) Gaussian blur with
zero padding.  `map = R a R^T`, `blurred = G map G^T`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unimmad_jax.losses import cosine_distance
from unimmad_jax.models.unimmad import ModelOutput
from unimmad_jax.packing import sum_over_pairs

BLUR_SIZE = 15
BLUR_SIGMA = 4.0
TOP_PIXELS_DIVISOR = 1000
"""The image score averages the top `H * W // TOP_PIXELS_DIVISOR` pixels of the blurred map."""


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """`[out, in]` weights of 1-D linear interpolation with `align_corners=True`."""
    positions = np.arange(out_size) * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    low = np.clip(np.floor(positions).astype(int), 0, in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = positions - low
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


def blur_matrix(size: int, kernel: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """`[size, size]` matrix of a normalised 1-D Gaussian convolution with zero padding `kernel // 2`."""
    offsets = np.arange(kernel) - kernel // 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    weights /= weights.sum()
    matrix = np.zeros((size, size))
    for offset, weight in zip(offsets, weights):
        matrix += weight * np.eye(size, k=offset)
    return matrix


def raw_anomaly_map(output: ModelOutput, batch_size: int, image_size: int) -> jax.Array:
    """`[B, H, W]`: sqrt of the sum over levels and valid modalities of the upsampled `(1 - cos)^2`."""
    total = 0.0
    for prior, decompressed in zip(output.prior, output.decompressed):
        distance = cosine_distance(prior, decompressed)
        resize_h = jnp.asarray(align_corners_matrix(image_size, distance.shape[1]), distance.dtype)
        resize_w = jnp.asarray(align_corners_matrix(image_size, distance.shape[2]), distance.dtype)
        upsampled = jnp.einsum("Hh,phw,Ww->pHW", resize_h, distance, resize_w)
        total = total + jnp.square(upsampled)
    return jnp.sqrt(sum_over_pairs(total, output.pairs, batch_size))


def blur(maps: jax.Array) -> jax.Array:
    """The Gaussian blur of `[B, H, W]` maps (zero padding)."""
    rows = jnp.asarray(blur_matrix(maps.shape[1]), maps.dtype)
    cols = jnp.asarray(blur_matrix(maps.shape[2]), maps.dtype)
    return jnp.einsum("Hh,bhw,Ww->bHW", rows, maps, cols)


def image_score(maps: jax.Array) -> jax.Array:
    """Mean of the top `H * W // TOP_PIXELS_DIVISOR` pixels of each `[B, H, W]` map."""
    flat = maps.reshape(maps.shape[0], -1)
    top, _ = jax.lax.top_k(flat, max(flat.shape[1] // TOP_PIXELS_DIVISOR, 1))
    return jnp.mean(top, axis=-1)
