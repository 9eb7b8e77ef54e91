import dataclasses

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models import layers
from unimmad_jax.models.unimmad import UniMMAD, abstract_variables, init_variables


def torch_conv_transpose(x, weight, stride, padding, bias=None):
    """PyTorch's ConvTranspose2d by its definition: each input pixel scatters `weight[i, o]` into the output.

    x `[C_in, H, W]`, weight `[C_in, C_out, k, k]` (PyTorch layout).
    """
    c_in, h, w = x.shape
    _, c_out, k, _ = weight.shape
    full = np.zeros((c_out, (h - 1) * stride + k, (w - 1) * stride + k))
    for i in range(h):
        for j in range(w):
            full[:, i * stride : i * stride + k, j * stride : j * stride + k] += np.einsum(
                "c,cokl->okl", x[:, i, j], weight
            )
    out = full[:, padding : full.shape[1] - padding, padding : full.shape[2] - padding]
    return out if bias is None else out + bias[:, None, None]


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1)])
def test_conv_transpose_is_pytorch_scatter(kernel, stride, padding, conv_impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 6))
    weight = rng.standard_normal((3, 4, kernel, kernel))
    bias = rng.standard_normal(4)
    module = layers.layer_forms(conv_impl).conv_transpose(4, kernel, stride=stride, padding=padding, use_bias=True)
    params = {"params": {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0)), "bias": jnp.asarray(bias)}}
    ours = module.apply(params, jnp.asarray(x.transpose(1, 2, 0))[None])[0]
    expected = torch_conv_transpose(x, weight, stride, padding, bias)
    assert ours.shape == (5 * stride, 6 * stride, 4)
    np.testing.assert_allclose(np.asarray(ours).transpose(2, 0, 1), expected, atol=1e-5)


def test_group_count_is_first_divisor():
    assert [layers.group_count(c) for c in (512, 170, 24, 9, 7)] == [32, 2, 8, 1, 1]


def test_conv_pads_symmetrically_like_pytorch():
    """A 3x3/2 conv with padding 1 (PyTorch) differs from XLA's 'SAME' on even sizes: check its first output."""
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    kernel = jnp.ones((3, 3, 1, 1))
    out = layers.conv(1, 3, stride=2).apply({"params": {"kernel": kernel}}, x)
    assert out.shape == (1, 2, 2, 1)
    assert float(out[0, 0, 0, 0]) == 0 + 1 + 4 + 5  # the window centred on (0, 0), its top and left padded


def test_batch_norm_mask_ignores_padded_rows():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    mask = jnp.array([True, True, False, False])
    bn = layers.batch_norm(train=True)
    variables = bn.init(jax.random.key(1), x)
    out_masked, stats_masked = bn.apply(variables, x, mask=mask[:, None, None, None], mutable=["batch_stats"])
    garbage = x.at[2:].set(100.0)
    out_garbage, stats_garbage = bn.apply(variables, garbage, mask=mask[:, None, None, None], mutable=["batch_stats"])
    out_valid_only, stats_valid_only = bn.apply(variables, x[:2], mutable=["batch_stats"])
    np.testing.assert_allclose(out_masked[:2], out_valid_only, atol=1e-6)
    np.testing.assert_allclose(out_garbage[:2], out_valid_only, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(stats_garbage), jax.tree_util.tree_leaves(stats_valid_only)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_batch_norm_running_variance_is_unbiased_like_pytorch():
    """Running variance: momentum 0.1 towards the unbiased variance of the valid rows; output: the biased one."""
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 2 + 1
    mask = jnp.array([True, True, True, False])
    bn = layers.batch_norm(train=True)
    variables = bn.init(jax.random.key(1), x)
    out, stats = bn.apply(variables, x, mask=mask[:, None, None, None], mutable=["batch_stats"])
    valid = np.asarray(x[:3], np.float64).reshape(-1, 2)  # n = 3 pairs x 3 x 3 pixels
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9 * 1 + 0.1 * valid.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * valid.mean(0), rtol=1e-5)
    expected = (np.asarray(x[:3]) - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
    np.testing.assert_allclose(out[:3], expected, atol=2e-5)


def test_l2_normalize_unit_norm_and_zero_safe():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    out = layers.l2_normalize(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_gelu_is_exact_erf_form():
    x = jnp.array(1.0)
    assert abs(float(layers.gelu(x)) - 0.8413447460685429) < 1e-6  # x * Phi(x); tanh form gives 0.84119


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_depthwise_conv_is_grouped_convolution(kernel, conv_impl):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
    weight = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 4))
    ours = layers.layer_forms(conv_impl).depthwise_conv(kernel).apply({"params": {"kernel": weight}}, x)
    pad = kernel // 2
    expected = jax.lax.conv_general_dilated(
        x, weight, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_is_a_1x1_convolution(stride, conv_impl):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (1, 1, 4, 3))
    bias = jax.random.normal(jax.random.key(2), (3,))
    module = layers.layer_forms(conv_impl).conv(3, 1, stride=stride, use_bias=True)
    assert isinstance(module, layers.PointwiseConv) == (conv_impl == "cpu")
    ours = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    expected = (
        jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + bias
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("channels", [512, 170, 8])
def test_group_norm_is_flax_group_norm_with_first_divisor_groups(channels, conv_impl):
    x = 3.0 + jax.random.normal(jax.random.key(0), (2, 5, 4, channels))
    params = {
        "scale": jax.random.normal(jax.random.key(1), (channels,)),
        "bias": jax.random.normal(jax.random.key(2), (channels,)),
    }
    ours = layers.layer_forms(conv_impl).group_norm().apply({"params": params}, x)
    expected = flax.linen.GroupNorm(
        num_groups=layers.group_count(channels), epsilon=1e-5, use_fast_variance=False
    ).apply({"params": params}, x)
    np.testing.assert_allclose(ours, expected, atol=2e-5)


def conv_same(x, kernel):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_per_sample_conv_sharded_over_eight_devices(kernel, conv_impl):
    """Each sample's own kernel, also when the batch is split over devices (XLA once got 1x1 wrong there)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    kernels = jax.random.normal(jax.random.key(1), (8, kernel, kernel, 4, 5))
    expected = jnp.concatenate([conv_same(x[i : i + 1], kernels[i]) for i in range(8)])
    split = NamedSharding(Mesh(np.asarray(jax.devices()[:8]), ("data",)), PartitionSpec("data"))
    per_sample_conv = layers.layer_forms(conv_impl).per_sample_conv
    sharded = jax.jit(per_sample_conv, in_shardings=(split, split))(x, kernels)
    np.testing.assert_allclose(sharded, expected, atol=1e-4)


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
def test_per_sample_conv_exports_for_any_batch_size(conv_impl):
    """`jax.export` with a symbolic batch (as `unimmad_jax.export` does) works in both forms and computes the
    per-sample convolution (a symbolic count cannot be the native form's feature group count)."""
    (batch,) = jax.export.symbolic_shape("b")
    per_sample_conv = layers.layer_forms(conv_impl).per_sample_conv
    exported = jax.export.export(jax.jit(per_sample_conv))(
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
    step = jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(layers.per_sample_conv(x, k))), argnums=(0, 1))
    expected = jax.jit(step)(x, kernels)
    split = sharding.batch_split(Mesh(np.asarray(jax.devices()[:8]), (sharding.DATA_AXIS,)))
    on_mesh = jax.jit(sharding.traced_on(split.mesh, step), in_shardings=(split, split))
    for a, b in zip(jax.tree_util.tree_leaves(on_mesh(x, kernels)), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "all-gather" not in on_mesh.lower(x, kernels).compile().as_text()
    left_to_xla = jax.jit(step, in_shardings=(split, split)).lower(x, kernels).compile().as_text()
    assert "all-gather" in left_to_xla  # if XLA stops gathering, the shard_map in per_sample_conv can go


@pytest.mark.parametrize("conv_impl", ["cpu", "native"])
def test_layer_forms_compute_in_their_dtype_with_float32_parameters(conv_impl):
    forms = layers.layer_forms(conv_impl, jnp.bfloat16)
    x = jnp.ones((2, 4, 4, 8), jnp.float32)
    modules = [
        forms.conv(8, 1),
        forms.conv(8, 3),
        forms.conv_transpose(8, 2, stride=2),
        forms.depthwise_conv(3),
        forms.group_norm(),
        forms.batch_norm(False),
    ]
    for module in modules:
        variables = module.init(jax.random.key(0), x)
        assert module.apply(variables, x).dtype == jnp.bfloat16, module
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables)), module
    kernels = jnp.ones((2, 3, 3, 8, 8), jnp.bfloat16)
    assert forms.per_sample_conv(x.astype(jnp.bfloat16), kernels).dtype == jnp.bfloat16


def test_auto_conv_impl_follows_the_backend_and_unknown_impls_are_named():
    assert layers.native_forms("auto") == (jax.default_backend() != "cpu")
    assert layers.native_forms("native") and not layers.native_forms("cpu")
    with pytest.raises(ValueError, match="conv_impl='gpu'"):
        layers.native_forms("gpu")


def test_conv_impls_agree_in_float64_on_the_tiny_model(tiny_config):
    """The CPU and native forms take the same parameters and give the same outputs and gradients."""
    models = {
        impl: UniMMAD(dataclasses.replace(tiny_config, conv_impl=impl, dtype="float64")) for impl in ("cpu", "native")
    }
    cpu_shapes = abstract_variables(models["cpu"].config, slots=2)
    native_shapes = abstract_variables(models["native"].config, slots=2)
    assert jax.tree_util.tree_structure(cpu_shapes) == jax.tree_util.tree_structure(native_shapes)
    assert jax.tree_util.tree_map(jnp.shape, cpu_shapes) == jax.tree_util.tree_map(jnp.shape, native_shapes)
    # The float32 tiny model's variables, whose compiled initialisation the other tests share.
    variables32 = init_variables(UniMMAD(tiny_config), seed=0, slots=2)
    assert jax.tree_util.tree_map(jnp.shape, variables32) == jax.tree_util.tree_map(jnp.shape, cpu_shapes)

    size = tiny_config.image_size
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables32)
        images = jax.random.normal(jax.random.key(1), (2, 2, size, size, 3), jnp.float64)
        mask = jnp.array([[True, True], [True, False]])

        def run(model):
            def loss_fn(params):
                out, _ = model.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    images,
                    mask,
                    train=True,
                    mutable=["batch_stats"],
                )
                loss, _ = total_loss(out, jnp.ones(2, jnp.float64), jnp.int32(0), LossConfig())
                return loss, out.decompressed

            return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

        (cpu_loss, cpu_out), cpu_grads = run(models["cpu"])
        (native_loss, native_out), native_grads = run(models["native"])
    np.testing.assert_allclose(native_loss, cpu_loss, rtol=1e-12)
    for ours, expected in zip(native_out, cpu_out):
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-11)
    assert jax.tree_util.tree_structure(native_grads) == jax.tree_util.tree_structure(cpu_grads)
    for (path, ours), expected in zip(
        jax.tree_util.tree_leaves_with_path(native_grads), jax.tree_util.tree_leaves(cpu_grads)
    ):
        # atol: gradients that are zero but for rounding (a bias before a normalisation)
        np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-12, err_msg=jax.tree_util.keystr(path))
