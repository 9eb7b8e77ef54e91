import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax.models import cmoe, layers

C, R, N, K = 8, 4, 3, 2


def conv_same(x, kernel):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_identity_kernel_convolution_is_identity():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, C))
    for k in (1, 3, 5):
        np.testing.assert_allclose(conv_same(x, cmoe.identity_kernel(None, (k, k, C, C))), x, atol=1e-6)


def test_router_dense_gate_holds_renormalised_top_k():
    stats = jax.random.normal(jax.random.key(0), (5, C))
    router = cmoe.Router(R, K)
    (routing,) = [router.apply(router.init(jax.random.key(1), stats), stats)]
    probs = np.asarray(routing.probs)
    expected_index = np.argsort(-probs, axis=1)[:, :K]
    np.testing.assert_array_equal(routing.index, expected_index)
    gate = np.asarray(routing.gate)
    assert ((gate > 0).sum(axis=1) == K).all()
    np.testing.assert_allclose(gate.sum(axis=1), 1.0, atol=1e-6)
    top = np.take_along_axis(probs, expected_index, axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(gate, expected_index, axis=1), top / top.sum(1, keepdims=True), rtol=1e-6
    )


def test_balance_loss_values():
    logits = jnp.zeros((3, R))
    uniform = cmoe.Routing(logits, jax.nn.softmax(logits), None, None, None)
    mask = jnp.array([True, True, False])
    # Uniform routing: no imbalance; z-loss = 1e-4 * log(R)^2.
    np.testing.assert_allclose(cmoe.balance_loss(uniform, mask), 1e-4 * np.log(R) ** 2, rtol=1e-6)
    skewed = jnp.array([[10.0, 0, 0, 0], [10.0, 0, 0, 0], [0, 0, 0, 10.0]])
    routing = cmoe.Routing(skewed, jax.nn.softmax(skewed), None, None, None)
    importance = np.asarray(jax.nn.softmax(skewed))[:2].mean(0)  # the padded third pair does not count
    cv2 = importance.var() / importance.mean() ** 2
    z = 1e-4 * np.mean(np.asarray(jax.nn.logsumexp(skewed, axis=-1))[:2] ** 2)
    np.testing.assert_allclose(cmoe.balance_loss(routing, mask), cv2 + z, rtol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("size", [7, 2])
def test_branch_equals_three_convolutions(kernel, size):
    """The branch == fixed + each routed expert + post 1x1, as the reference runs it; `post` folded or not."""
    batch, slots = 2, 2
    assert cmoe.fold_post(size * size, kernel, C, batch * slots) == (size == 7 or kernel == 1)
    general_map = jax.random.normal(jax.random.key(0), (batch, size, size, C))
    stats = jax.random.normal(jax.random.key(1), (slots * batch, C))
    base = jax.random.normal(jax.random.key(2), (N, kernel, kernel, C, C)) / (kernel * np.sqrt(C))
    module = cmoe.MiMoE(kernel, C, R, K)
    params = module.init(jax.random.key(3), general_map, stats, base)["params"]
    params["fixed_expert"] = params["fixed_expert"] + 0.1 * jax.random.normal(
        jax.random.key(4), params["fixed_expert"].shape
    )
    fused, routing = module.apply({"params": params}, general_map, stats, base)

    x = layers.ConvNormAct(C).apply({"params": params["pre"]}, general_map)
    mix = jax.nn.softmax(params["leader_logits"], axis=1)  # [R, N, C]
    leaders = jnp.einsum("rnc,nhwic->rhwic", mix, base)  # W_r, per output channel c
    for pair in range(slots * batch):
        sample = pair // slots
        xs = x[sample : sample + 1]
        fixed = conv_same(xs, params["fixed_expert"])
        routed = sum(routing.score[pair, j] * conv_same(xs, leaders[routing.index[pair, j]]) for j in range(K))
        y = jnp.concatenate([fixed, routed], axis=-1) @ params["post"]
        expected = layers.NormAct().apply({"params": params["post_norm"]}, y)
        np.testing.assert_allclose(fused[pair], expected[0], atol=2e-5)


def cross_moe_run(prior, mask, train=True):
    general = jax.random.normal(jax.random.key(5), (2, 8, 8, 16))
    module = cmoe.CrossMoE(16, embed_dim=C, base_num=N, router_num=R, top_k=K)
    variables = module.init(jax.random.key(6), general, prior, mask, train=False)
    (y, loss, _), updates = module.apply(variables, general, prior, mask, train=train, mutable=["batch_stats"])
    return y, loss, updates["batch_stats"]


def test_padded_pairs_change_no_output_loss_or_statistic():
    prior = jax.random.normal(jax.random.key(7), (4, 8, 8, 16))  # 2 samples x 2 slots, sample-major
    mask = jnp.array([True, True, True, False])  # sample 1 has one modality
    y, loss, stats = cross_moe_run(prior, mask)
    y2, loss2, stats2 = cross_moe_run(prior.at[3].set(50.0), mask)
    np.testing.assert_allclose(y[:3], y2[:3], atol=1e-5)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    _, loss_all_valid, stats_all_valid = cross_moe_run(prior.at[3].set(50.0), jnp.ones(4, bool))
    assert abs(float(loss_all_valid) - float(loss)) > 1e-6  # the mask is what kept the garbage out
    assert not np.allclose(stats_all_valid["cond_bn"]["var"], stats["cond_bn"]["var"])


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_per_sample_conv_sharded_over_eight_devices(kernel, conv_impl):
    """Each sample's own kernel, also when the batch is split over devices (XLA once got 1x1 wrong there)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    kernels = jax.random.normal(jax.random.key(1), (8, kernel, kernel, 4, 5))
    expected = jnp.concatenate([conv_same(x[i : i + 1], kernels[i]) for i in range(8)])
    split = NamedSharding(Mesh(np.asarray(jax.devices()[:8]), ("data",)), PartitionSpec("data"))
    sharded = jax.jit(functools.partial(cmoe.per_sample_conv, conv_impl=conv_impl), in_shardings=(split, split))(
        x, kernels
    )
    np.testing.assert_allclose(sharded, expected, atol=1e-4)


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
def test_per_sample_conv_exports_for_any_batch_size(conv_impl):
    """`jax.export` with a symbolic batch (as `unimmad_jax.export` does) works in both forms and computes the
    per-sample convolution (a symbolic count cannot be the native form's feature group count)."""
    (batch,) = jax.export.symbolic_shape("b")
    conv = functools.partial(cmoe.per_sample_conv, conv_impl=conv_impl)
    exported = jax.export.export(jax.jit(conv))(
        jax.ShapeDtypeStruct((batch, 6, 6, 4), jnp.float32), jax.ShapeDtypeStruct((batch, 3, 3, 4, 5), jnp.float32)
    )
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 4))
    kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 5))
    expected = jnp.concatenate([conv_same(x[i : i + 1], kernels[i]) for i in range(3)])
    np.testing.assert_allclose(exported.call(x, kernels), expected, atol=1e-4)


def test_native_per_sample_conv_on_a_mesh_convolves_each_devices_own_samples():
    """Traced on a mesh of 8 devices (`sharding.traced_on`, as the train and score steps are), the
    native per-sample convolution and its gradients are those computed without a mesh, and no device
    gathers the batch, which XLA's partitioner does for the convolution left to itself."""
    from jax.sharding import Mesh

    from unimmad_jax import sharding

    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 4))
    kernels = jax.random.normal(jax.random.key(1), (16, 3, 3, 4, 5))
    step = jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(cmoe.per_sample_conv(x, k, "native"))), argnums=(0, 1))
    expected = jax.jit(step)(x, kernels)
    split = sharding.batch_split(Mesh(np.asarray(jax.devices()[:8]), (sharding.DATA_AXIS,)))
    on_mesh = jax.jit(sharding.traced_on(split.mesh, step), in_shardings=(split, split))
    for a, b in zip(jax.tree_util.tree_leaves(on_mesh(x, kernels)), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "all-gather" not in on_mesh.lower(x, kernels).compile().as_text()
    left_to_xla = jax.jit(step, in_shardings=(split, split)).lower(x, kernels).compile().as_text()
    assert "all-gather" in left_to_xla  # if XLA stops gathering, the shard_map in per_sample_conv can go


def router_run(router_condition, general, params=None):
    """The C-MoE's output, loss and routings on a fixed prior; parameters initialised under `router_condition`."""
    prior = jax.random.normal(jax.random.key(7), (4, 8, 8, 16))
    mask = jnp.ones(4, bool)
    module = cmoe.CrossMoE(16, embed_dim=C, base_num=N, router_num=R, top_k=K, router_condition=router_condition)
    variables = module.init(jax.random.key(6), general, prior, mask, train=False)
    if params is not None:
        variables = {**variables, "params": params}
    return module.apply(variables, general, prior, mask, train=False), variables


def test_router_condition_default_is_cross_and_keeps_the_parameters():
    assert cmoe.CrossMoE(16).router_condition == "cross"
    general = jax.random.normal(jax.random.key(5), (2, 8, 8, 16))
    _, cross = router_run("cross", general)
    _, specific = router_run("specific", general)
    shapes = functools.partial(jax.tree.map, jnp.shape)
    assert shapes(cross) == shapes(specific)


def test_specific_router_ignores_the_general_feature():
    general = jax.random.normal(jax.random.key(5), (2, 8, 8, 16))
    other = jax.random.normal(jax.random.key(8), (2, 8, 8, 16))
    _, variables = router_run("cross", general)
    for condition, ignores_general in (("specific", True), ("cross", False)):
        (_, _, routings), _ = router_run(condition, general, variables["params"])
        (_, _, other_routings), _ = router_run(condition, other, variables["params"])
        for a, b in zip(routings, other_routings):
            assert np.allclose(a.logits, b.logits, atol=1e-6) == ignores_general, condition


def test_router_conditions_agree_without_the_general_feature():
    """A zero general feature gives a zero general map (GroupNorm's bias starts at zero): nothing else differs."""
    general = jnp.zeros((2, 8, 8, 16))
    _, variables = router_run("cross", general)
    cross, _ = router_run("cross", general, variables["params"])
    specific, _ = router_run("specific", general, variables["params"])
    for a, b in zip(jax.tree.leaves(cross), jax.tree.leaves(specific)):
        np.testing.assert_array_equal(a, b)
