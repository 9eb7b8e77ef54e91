"""Compile each layer form alone for a TPU slice, without a TPU: the README's layer-form table.

    pip install "jax[tpu]==0.10.2"
    python -m experiments.compile.tpu_layer_forms --topology=v5e:2x4 [--per-device-batch=8] [--json=OUT]

Each row is one of the model's layers at the size it has in the full model (256 px, bf16), run
forward and backward (the gradients of a sum of squares with respect to its input and its
weights) over a data mesh of the topology, batch split, weights replicated (the per-pair kernels
split with their samples), traced on the mesh as the model's steps are, once per form of
`model.conv_impl`.  Reported per device: XLA's FLOPs, bytes accessed and the peak memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from experiments.compile import report

report.compile_for_tpu_here()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from unimmad_jax import packing, sharding  # noqa: E402
from unimmad_jax.models import cmoe, layers  # noqa: E402

flags.DEFINE_string("topology", "v5e:2x4", "A TPU topology, e.g. v5e:2x4, v4:2x2x2.")
flags.DEFINE_string("chip-config", None, "libtpu's chip config, e.g. 'megacore' for v4 and v5p.")
flags.DEFINE_integer("per-device-batch", 8, "Images per device (per-pair layers: 2 slots an image).")
flags.DEFINE_string("json", None, "Write the rows here.")
FLAGS = flags.FLAGS

DTYPE = jnp.bfloat16
SLOTS = 2


class Form(NamedTuple):
    """One layer form: `apply(weights, x)`, its weights' shapes and the (global) input shape."""

    apply: Callable
    weights: Any
    input_shape: tuple[int, ...]
    per_sample_weights: bool = False
    """Weights with one entry a sample (the per-pair kernels), split over the data axis as the batch."""


def module_layer(module, input_shape) -> Form:
    weights = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *input_shape[1:]), DTYPE))
    return Form(module.apply, weights, input_shape)


def pair_conv_layer(kernel: int, forms: layers.LayerForms, batch: int) -> Form:
    """The C-MoE's per-pair convolution at level 0: 64 x 64, 256 channels, one kernel a (sample, slot) pair."""
    weights = jax.ShapeDtypeStruct((batch * SLOTS, kernel, kernel, 256, 256), DTYPE)

    def conv(w, x):
        return cmoe.pair_conv(x, w, packing.full_pairs(jnp.ones((batch, SLOTS), bool)), forms.per_sample_conv)

    return Form(conv, weights, (batch, 64, 64, 256), per_sample_weights=True)


def layer_rows(batch: int) -> dict[str, dict[str, Form]]:
    """name -> conv_impl -> form; batch is global."""
    rows = {}
    for impl in layers.CONV_IMPLS[1:]:
        impl_forms = layers.layer_forms(impl, DTYPE)
        forms = {
            "per-pair conv k5, 64 x 64, 256 channels, 2 slots": pair_conv_layer(5, impl_forms, batch),
            "per-pair conv k3": pair_conv_layer(3, impl_forms, batch),
            "depthwise k5, 32 x 32 x 512": module_layer(impl_forms.depthwise_conv(5), (batch, 32, 32, 512)),
            "transposed conv k4/s2/p1, 16 x 16 x 1024 -> 512": module_layer(
                impl_forms.conv_transpose(512, 4, stride=2, padding=1), (batch, 16, 16, 1024)
            ),
            "transposed conv k2/s2": module_layer(impl_forms.conv_transpose(512, 2, stride=2), (batch, 16, 16, 1024)),
            "GroupNorm, 64 x 64 x 256": module_layer(impl_forms.group_norm(), (batch, 64, 64, 256)),
            "1x1 conv, 64 x 64, 256 -> 512": module_layer(impl_forms.conv(512, 1), (batch, 64, 64, 256)),
        }
        for name, form in forms.items():
            rows.setdefault(name, {})[impl] = form
    return rows


def compile_form(form: Form, mesh) -> dict:
    """FLOPs, bytes accessed and peak memory per device of the form's forward and backward pass."""

    def loss(w, x):
        return jnp.sum(jnp.square(form.apply(w, x).astype(jnp.float32)))

    split = sharding.batch_split(mesh)
    weights_sharding = split if form.per_sample_weights else sharding.replicated(mesh)
    step = jax.jit(
        sharding.traced_on(mesh, jax.grad(loss, argnums=(0, 1))),
        in_shardings=(weights_sharding, split),
        out_shardings=(weights_sharding, split),
    )
    abstract_weights = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=weights_sharding), form.weights
    )
    x = jax.ShapeDtypeStruct(form.input_shape, DTYPE, sharding=split)
    compiled = step.trace(abstract_weights, x).lower().compile()
    cost = compiled.cost_analysis()
    return {
        "flops_per_device": float(cost["flops"]),
        "bytes_accessed_per_device": float(cost["bytes accessed"]),
        "peak_memory_bytes_per_device": compiled.memory_analysis().peak_memory_in_bytes,
    }


def main(argv) -> int:
    del argv
    topology = report.tpu_topology(FLAGS.topology, FLAGS["chip-config"].value)
    mesh = report.topology_mesh(topology)
    batch = FLAGS["per-device-batch"].value * len(topology.devices)
    results = {}
    print(f"per device of {FLAGS.topology}, {FLAGS['per-device-batch'].value} images each, forward and backward:")
    print("| layer | cpu form: GFLOP / GB / peak MiB | native form: GFLOP / GB / peak MiB |\n|---|---|---|")
    for name, forms in layer_rows(batch).items():
        results[name] = {impl: compile_form(form, mesh) for impl, form in forms.items()}
        cells = [
            f"{r['flops_per_device'] / 1e9:.3g} / {r['bytes_accessed_per_device'] / 1e9:.3g} / "
            f"{r['peak_memory_bytes_per_device'] / 2**20:.0f}"
            for r in results[name].values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"topology": FLAGS.topology, "per_device_batch": FLAGS["per-device-batch"].value, **results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
