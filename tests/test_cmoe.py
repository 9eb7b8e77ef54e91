import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax.models import cmoe, layers
from unimmad_jax.packing import PAIR_KEYS, PairIndex, full_pairs, pack_pairs

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


def test_fold_post_decides_a_symbolic_pair_count_as_one_pair():
    (pairs,) = jax.export.symbolic_shape("p")  # the exported model's: a batch may have a single pair
    for pixels, kernel in ((4, 1), (4, 5), (64, 3)):
        assert cmoe.fold_post(pixels, kernel, C, pairs) == cmoe.fold_post(pixels, kernel, C, 1)
    assert not cmoe.fold_post(4, 1, C, 1) and cmoe.fold_post(4, 1, C, 16)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("size", [7, 2])
def test_branch_equals_three_convolutions(kernel, size):
    """The branch == fixed + each routed expert + post 1x1, as the reference runs it; `post` folded or not."""
    batch, slots = 2, 2
    assert cmoe.fold_post(size * size, kernel, C, batch * slots) == (size == 7 or kernel == 1)
    general_map = jax.random.normal(jax.random.key(0), (batch, size, size, C))
    stats = jax.random.normal(jax.random.key(1), (slots * batch, C))
    base = jax.random.normal(jax.random.key(2), (N, kernel, kernel, C, C)) / (kernel * np.sqrt(C))
    forms = layers.layer_forms("auto")
    module = cmoe.MiMoE(kernel, C, R, K, forms.conv, forms.group_norm, forms.per_sample_conv)
    pairs = full_pairs(jnp.ones((batch, slots), bool))
    params = module.init(jax.random.key(3), general_map, stats, base, pairs)["params"]
    params["fixed_expert"] = params["fixed_expert"] + 0.1 * jax.random.normal(
        jax.random.key(4), params["fixed_expert"].shape
    )
    fused, routing = module.apply({"params": params}, general_map, stats, base, pairs)

    x = layers.ConvNormAct(C, layers.conv, layers.GroupNorm).apply({"params": params["pre"]}, general_map)
    mix = jax.nn.softmax(params["leader_logits"], axis=1)  # [R, N, C]
    leaders = jnp.einsum("rnc,nhwic->rhwic", mix, base)  # W_r, per output channel c
    for pair in range(slots * batch):
        sample = pair // slots
        xs = x[sample : sample + 1]
        fixed = conv_same(xs, params["fixed_expert"])
        routed = sum(routing.score[pair, j] * conv_same(xs, leaders[routing.index[pair, j]]) for j in range(K))
        y = jnp.concatenate([fixed, routed], axis=-1) @ params["post"]
        expected = layers.NormAct(layers.GroupNorm).apply({"params": params["post_norm"]}, y)
        np.testing.assert_allclose(fused[pair], expected[0], atol=2e-5)


def cross_moe_run(prior, mask, train=True):
    general = jax.random.normal(jax.random.key(5), (2, 8, 8, 16))
    module = cmoe.CrossMoE(16, layers.layer_forms("auto"), embed_dim=C, base_num=N, router_num=R, top_k=K)
    pairs = full_pairs(mask.reshape(2, -1))
    variables = module.init(jax.random.key(6), general, prior, pairs, train=False)
    (y, loss, _), updates = module.apply(variables, general, prior, pairs, train=train, mutable=["batch_stats"])
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
def test_packed_pairs_give_the_padded_results(conv_impl):
    """On a packed batch (2 groups of 2 samples, 3 pairs each) the C-MoE's valid outputs, loss and
    BatchNorm statistics are those of every slot computed, in either layer form."""
    mask = np.array([[True, False], [True, True], [False, True], [True, False]])
    general = jax.random.normal(jax.random.key(5), (4, 8, 8, 16))
    prior = jax.random.normal(jax.random.key(7), (8, 8, 8, 16))  # every (sample, slot), sample-major
    module = cmoe.CrossMoE(16, layers.layer_forms(conv_impl), embed_dim=C, base_num=N, router_num=R, top_k=K)
    full = full_pairs(jnp.asarray(mask))
    variables = module.init(jax.random.key(6), general, prior, full, train=False)
    (y, loss, _), updates = module.apply(variables, general, prior, full, train=True, mutable=["batch_stats"])
    fields = pack_pairs(mask, groups=2, budget=3)
    packed = PairIndex(*(jnp.asarray(fields[key]) for key in PAIR_KEYS))
    index = ((np.arange(2)[:, None] * 2 + fields["pair_sample"]) * 2 + fields["pair_slot"]).reshape(-1)
    (y_packed, loss_packed, _), updates_packed = module.apply(
        variables, general, prior[index], packed, train=True, mutable=["batch_stats"]
    )
    valid = fields["pair_valid"].reshape(-1)
    assert valid.sum() == mask.sum() and (index[valid] == np.flatnonzero(mask)).all()
    np.testing.assert_allclose(y_packed[valid], y[index[valid]], atol=2e-5)
    np.testing.assert_allclose(loss_packed, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(updates_packed), jax.tree.leaves(updates)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def router_run(router_condition, general, params=None):
    """The C-MoE's output, loss and routings on a fixed prior; parameters initialised under `router_condition`."""
    prior = jax.random.normal(jax.random.key(7), (4, 8, 8, 16))
    pairs = full_pairs(jnp.ones((2, 2), bool))
    forms = layers.layer_forms("auto")
    module = cmoe.CrossMoE(16, forms, embed_dim=C, base_num=N, router_num=R, top_k=K, router_condition=router_condition)
    variables = module.init(jax.random.key(6), general, prior, pairs, train=False)
    if params is not None:
        variables = {**variables, "params": params}
    return module.apply(variables, general, prior, pairs, train=False), variables


def test_router_condition_default_is_cross_and_keeps_the_parameters():
    assert cmoe.CrossMoE(16, layers.layer_forms("auto")).router_condition == "cross"
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
