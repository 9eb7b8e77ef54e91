import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax.losses import LossConfig, cosine_distance, decompression_loss, moe_weight, total_loss
from unimmad_jax.models.unimmad import ModelOutput
from unimmad_jax.packing import full_pairs


def output_with(distance_per_pair, pair_mask, slots=2):
    """A 1-level output whose pair p (of `slots` per sample) has a constant cosine distance
    `distance_per_pair[p]` at every pixel."""
    angles = np.arccos(1.0 - np.asarray(distance_per_pair))
    prior = np.zeros((len(angles), 2, 2, 2))
    prior[..., 0] = 1.0
    decompressed = np.stack([np.cos(angles), np.sin(angles)], axis=-1)[:, None, None, :] * np.ones((1, 2, 2, 1))
    pairs = full_pairs(jnp.asarray(pair_mask).reshape(-1, slots))
    return ModelOutput([jnp.asarray(prior)], [jnp.asarray(decompressed)], pairs.mask, jnp.zeros(1), [], pairs)


def test_cosine_distance_matches_definition_and_is_zero_safe():
    a = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    b = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_distance(a, b), [1 - 1 / np.sqrt(2), 1.0], rtol=1e-6)


@pytest.mark.parametrize("weighting", ["batch_mean", "per_sample"])
def test_decompression_loss_is_focal_mean_over_valid_pairs(weighting):
    # 2 samples x 2 slots, sample-major; pair 3 (slot 1 of sample 1) is padding.
    distance = np.array([0.5, 0.2, 0.4, 1.9])
    weight = np.array([1.0, 10.0])
    out = output_with(distance, [True, True, True, False])
    pair_weight = np.full(3, weight.mean()) if weighting == "batch_mean" else weight[[0, 0, 1]]
    expected = np.mean(distance[:3] ** 3 * pair_weight)  # d * sg(d)^2, times 3 levels / 3 levels
    got = decompression_loss(out, jnp.asarray(weight), LossConfig(weighting=weighting))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_annealing_schedules():
    reference = LossConfig()
    assert float(moe_weight(0, reference)) == 1.0
    np.testing.assert_allclose(moe_weight(10, reference), 0.95)
    np.testing.assert_allclose(moe_weight(250, reference), 0.001)  # floor past the fixed 200-epoch horizon
    paper = LossConfig(moe_anneal="paper", moe_horizon=300)
    np.testing.assert_allclose(moe_weight(150, paper), 0.25)
    assert float(moe_weight(300, paper)) == 0.0


def test_total_loss_adds_annealed_mean_moe():
    out = output_with([0.5], [True], slots=1)._replace(moe_loss=jnp.array([0.3, 0.6, 0.9]))
    total, parts = total_loss(out, jnp.ones(1), 10, LossConfig())
    np.testing.assert_allclose(parts["moe_loss"], 0.95 * 0.6, rtol=1e-6)
    np.testing.assert_allclose(total, 0.125 + 0.95 * 0.6, rtol=1e-6)


def test_loss_config_names_bad_fields():
    with pytest.raises(ValueError, match="loss.weighting='mean'"):
        LossConfig(weighting="mean")
    with pytest.raises(ValueError, match="loss.moe_anneal"):
        LossConfig(moe_anneal="cosine")
