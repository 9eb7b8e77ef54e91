import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models.unimmad import FROZEN, ModelConfig, UniMMAD, init_variables, share_image


@pytest.fixture(scope="module")
def model(tiny_config):
    return UniMMAD(tiny_config)


@pytest.fixture(scope="module")
def batch(tiny_config):
    images = jax.random.normal(jax.random.key(0), (2, 2, tiny_config.image_size, tiny_config.image_size, 3))
    mask = jnp.array([[True, True], [True, False]])
    return images.at[1, 1].set(0.0), mask


@pytest.fixture(scope="module")
def variables(model, batch):
    return init_variables(model, seed=1, slots=2)


@pytest.fixture(scope="module")
def train_apply(model):
    return jax.jit(lambda v, x, m: model.apply(v, x, m, train=True, mutable=["batch_stats"]))


def test_output_shapes(tiny_config, model, variables, batch):
    out = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))(variables, *batch)
    size = tiny_config.image_size
    for level, (dim, stride) in enumerate(zip(tiny_config.feature_dims, (4, 8, 16))):
        assert out.prior[level].shape == (4, size // stride, size // stride, dim)
        assert out.decompressed[level].shape == out.prior[level].shape
    np.testing.assert_array_equal(out.pair_mask, [True, True, True, False])  # sample-major: (b0,s0), (b0,s1), ...
    assert out.moe_loss.shape == (3,)
    assert out.routing[0][2].index.shape == (4, tiny_config.top_k)


def test_padded_slots_change_no_output_or_statistic(variables, batch, train_apply):
    images, mask = batch
    out, stats = train_apply(variables, images, mask)
    garbage = images.at[1, 1].set(7.0)
    out2, stats2 = train_apply(variables, garbage, mask)
    valid = np.asarray(out.pair_mask)
    for a, b in zip(out.prior + out.decompressed, out2.prior + out2.decompressed):
        np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-6)
    np.testing.assert_allclose(out.moe_loss, out2.moe_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_fewer_slots_give_the_same_pairs(model, variables, tiny_config):
    """A batch of single-modality samples packed in 1 slot computes what the same batch padded to 2 slots does."""
    size = tiny_config.image_size
    images = jax.random.normal(jax.random.key(2), (2, 1, size, size, 3))
    run = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
    one = run(variables, images, jnp.ones((2, 1), bool))
    padded = run(
        variables, jnp.concatenate([images, jnp.zeros_like(images)], axis=1), jnp.array([[True, False], [True, False]])
    )
    for a, b in zip(one.decompressed, padded.decompressed):
        np.testing.assert_allclose(a, b[::2], atol=1e-5)


def test_fewer_slots_train_like_padded_ones(model, variables, tiny_config):
    """In training too (what batches of any `num_slots` rely on): the loss and the BatchNorm statistics
    of a batch in 1 slot are those of the batch padded to 2 slots."""
    size = tiny_config.image_size
    images = jax.random.normal(jax.random.key(3), (2, 1, size, size, 3))

    @jax.jit
    def loss_and_statistics(v, x, m):
        out, updates = model.apply(v, x, m, train=True, mutable=["batch_stats"])
        return total_loss(out, jnp.ones(2), 0, LossConfig())[0], updates["batch_stats"]

    one = loss_and_statistics(variables, images, jnp.ones((2, 1), bool))
    padded = loss_and_statistics(
        variables, jnp.concatenate([images, jnp.zeros_like(images)], axis=1), jnp.array([[True, False], [True, False]])
    )
    np.testing.assert_allclose(one[0], padded[0], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(one[1]), jax.tree_util.tree_leaves(padded[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_prior_gets_no_gradient(model, variables, batch):
    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, *batch, train=True, mutable=["batch_stats"]
        )
        return total_loss(out, jnp.ones(2), 0, LossConfig())[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert FROZEN == ("prior",)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads["prior"]))
    assert float(jnp.max(jnp.abs(grads["encoder"]["conv1"]["kernel"]))) > 0
    assert float(jnp.max(jnp.abs(grads["cmoe2"]["base_k5"]))) > 0


def test_prior_batch_norm_stays_in_eval_mode(variables, batch, train_apply):
    _, stats = train_apply(variables, *batch)
    np.testing.assert_array_equal(
        stats["batch_stats"]["prior"]["bn1"]["mean"], variables["batch_stats"]["prior"]["bn1"]["mean"]
    )
    assert not np.allclose(
        stats["batch_stats"]["encoder"]["bn1"]["mean"], variables["batch_stats"]["encoder"]["bn1"]["mean"]
    )


def test_share_image():
    images = jnp.arange(2 * 2 * 1 * 1 * 3, dtype=jnp.float32).reshape(2, 2, 1, 1, 3)
    share = share_image(images, max_modalities=4)
    assert share.shape == (2, 1, 1, 12)
    np.testing.assert_array_equal(share[1, 0, 0, :6], images[1, :, 0, 0].reshape(-1))
    np.testing.assert_array_equal(share[:, :, :, 6:], 0)


def test_config_rejects_bad_image_size_and_fields():
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of 32"):
        ModelConfig(image_size=100)
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['widht'\]"):
        ModelConfig.from_mapping({"widht": 3})
    with pytest.raises(ValueError, match=r"model.router_condition='general' is not one of \('cross', 'specific'\)"):
        ModelConfig(router_condition="general")
    assert ModelConfig().router_condition == "cross"


def test_wrong_image_size_is_named(model, variables, tiny_config):
    with pytest.raises(ValueError, match="do not fit a model of image_size 64"):
        model.apply(variables, jnp.zeros((1, 1, 32, 32, 3)), jnp.ones((1, 1), bool), train=False)
