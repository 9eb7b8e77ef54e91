import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from unimmad_jax import anomaly_map
from unimmad_jax.models.unimmad import ModelOutput
from unimmad_jax.packing import full_pairs


def align_corners_resize(a, size):
    """Bilinear resize with align_corners=True, pixel by pixel."""
    h, w = a.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y, x = i * (h - 1) / (size - 1), j * (w - 1) / (size - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                (1 - fy) * (1 - fx) * a[y0, x0]
                + (1 - fy) * fx * a[y0, x1]
                + fy * (1 - fx) * a[y1, x0]
                + fy * fx * a[y1, x1]
            )
    return out


def test_align_corners_matrix_matches_pixelwise_resize():
    a = np.random.default_rng(0).random((4, 4))
    r = anomaly_map.align_corners_matrix(16, 4)
    np.testing.assert_allclose(r @ a @ r.T, align_corners_resize(a, 16), atol=1e-12)
    np.testing.assert_allclose(r.sum(axis=1), 1.0)


def test_blur_is_zero_padded_normalised_gaussian():
    maps = np.random.default_rng(1).random((2, 20, 20))
    offsets = np.arange(15) - 7
    g = np.exp(-(offsets**2) / 32.0)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    expected = np.stack([ndimage.correlate(m, kernel, mode="constant", cval=0.0) for m in maps])
    np.testing.assert_allclose(anomaly_map.blur(jnp.asarray(maps)), expected, atol=1e-6)


def test_image_score_is_mean_of_top_thousandth():
    maps = np.zeros((1, 100, 100))
    maps[0, 0, :10] = np.arange(10.0)  # k = 10000 // 1000 = 10 pixels
    maps[0, 1, 0] = 100.0
    np.testing.assert_allclose(anomaly_map.image_score(jnp.asarray(maps)), (100 + 45 - 0) / 10)


def test_raw_map_sums_valid_modalities_only():
    # 2 samples x 2 slots; one level at 2x2; every pair has distance 1 except where set.
    prior = np.zeros((4, 2, 2, 2))
    prior[..., 0] = 1.0
    decompressed = np.zeros((4, 2, 2, 2))
    decompressed[..., 1] = 1.0  # orthogonal: distance 1 everywhere
    decompressed[1, ..., :] = [1.0, 0.0]  # pair 1 = slot 1 of sample 0: distance 0
    pairs = full_pairs(jnp.array([[True, True], [True, False]]))
    out = ModelOutput([jnp.asarray(prior)], [jnp.asarray(decompressed)], pairs.mask, jnp.zeros(1), [], pairs)
    raw = anomaly_map.raw_anomaly_map(out, batch_size=2, image_size=4)
    np.testing.assert_allclose(raw[0], 1.0, atol=1e-6)  # sqrt(1^2 + 0^2)
    np.testing.assert_allclose(raw[1], 1.0, atol=1e-6)  # its padded pair 3 (distance 1) is ignored
