"""Exact pair packing (#24): a packed batch's train step and maps are the padded batch's, in float64.

One batch of 16 samples with 1, 2, 3 and 4 of 4 modalities, packed in 8 groups with a budget of
5 pairs (of 8 slots per group); the padded step (no pair fields: every slot computed) is the oracle.
The tiny model runs at the smallest size it takes: packing does not depend on the size, and a CPU
computes float64 convolutions slowly.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from unimmad_jax import evaluate, packing, sharding, train
from unimmad_jax.losses import LossConfig
from unimmad_jax.models.unimmad import IMAGE_SIZE_MULTIPLE, UniMMAD, init_variables

GROUPS, BUDGET, SLOTS = 8, 5, 4
COUNTS = (1, 4, 2, 3, 3, 2, 4, 1, 1, 1, 2, 2, 1, 3, 2, 1)
"""Valid modalities of each sample: 5 pairs or fewer in each group of 2 rows."""
LOSS_RTOL, GRAD_RTOL = 1e-12, 1e-10
ZERO_UP_TO_ROUNDING = 1e-12
"""Relative to the largest magnitude of all arrays: below it an array is zero up to float64 rounding."""


@pytest.fixture(scope="module")
def config32(tiny_config):
    """The tiny model at 32 px, the smallest size (`IMAGE_SIZE_MULTIPLE`)."""
    return dataclasses.replace(tiny_config, image_size=IMAGE_SIZE_MULTIPLE)


def mesh_of(devices: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:devices]), (sharding.DATA_AXIS,))


def recorded_gradients() -> optax.GradientTransformation:
    """An optimizer whose state is the last step's gradients, the parameters left as they are."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


@pytest.fixture(scope="module")
def padded_batch(config32):
    rng = np.random.default_rng(0)
    mask = np.zeros((len(COUNTS), SLOTS), bool)
    for row, count in enumerate(COUNTS):
        mask[row, rng.choice(SLOTS, count, replace=False)] = True
    size = config32.image_size
    return {
        "specific_images": rng.standard_normal((len(COUNTS), SLOTS, size, size, 3)),
        "modality_mask": mask,
        "loss_weight": rng.uniform(0.5, 2.0, len(COUNTS)),
    }


@pytest.fixture(scope="module")
def packed_batch(padded_batch):
    fields = packing.pack_pairs(padded_batch["modality_mask"], GROUPS, BUDGET)
    assert BUDGET < len(COUNTS) // GROUPS * SLOTS and fields["pair_valid"].sum(axis=1).max() == BUDGET
    return {**padded_batch, **fields}


@pytest.fixture(scope="module")
def model64(config32):
    return UniMMAD(dataclasses.replace(config32, dtype="float64"))


@pytest.fixture(scope="module")
def variables64(config32):
    variables = init_variables(UniMMAD(config32), seed=0, slots=2)
    with jax.enable_x64(True):
        return jax.tree.map(lambda a: np.asarray(a, np.float64), variables)


def run_step(model, variables, batch, devices: int):
    """The loss, gradients and BatchNorm buffers of one train step on `devices`, and the compiled step's HLO."""
    mesh = mesh_of(devices)
    with jax.enable_x64(True):
        state = train.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=recorded_gradients().init(variables["params"]),
            tx=recorded_gradients(),
        )
        state = jax.device_put(state, sharding.replicated(mesh))
        step = train.make_train_step(model, LossConfig(weighting="per_sample"), mesh)
        inputs = sharding.to_global(batch, mesh)
        compiled = step.lower(state, inputs, jnp.int32(0)).compile()
        state, metrics = compiled(state, inputs, jnp.int32(0))
        return jax.device_get((metrics, state.opt_state, state.batch_stats)), compiled.as_text()


def assert_close_leaves(actual, expected, rtol):
    """Each array within `rtol` of its largest magnitude; an array zero up to rounding (an analytically zero
    gradient, e.g. a bias before a normalisation) within `rtol` of the largest magnitude of all arrays."""
    pairs = list(zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True))
    overall = max(np.max(np.abs(b)) for _, b in pairs)
    failures = []
    for a, b in pairs:
        scale = np.max(np.abs(b))
        scale = overall if scale < ZERO_UP_TO_ROUNDING * overall else scale
        if not np.max(np.abs(a - b)) <= rtol * scale:
            failures.append((a.shape, float(np.max(np.abs(a - b)) / scale)))
    assert not failures, failures


def activation_all_gathers(hlo: str) -> list[str]:
    """The result shapes of a compiled step's all-gathers of 4-D or 5-D (image or feature) arrays."""
    return sorted(re.findall(r"= (\w+\[\d+(?:,\d+){3,4}\])\{[^}]*\} all-gather", hlo))


@pytest.fixture(scope="module")
def padded_on_one(model64, variables64, padded_batch):
    return run_step(model64, variables64, padded_batch, 1)[0]


@pytest.fixture(scope="module")
def padded_hlo(model64, variables64, padded_batch, padded_on_one):
    """The padded step's compiled HLO on `devices`; its results equal those on 1 device."""

    def on(devices: int) -> str:
        (metrics, _, _), hlo = run_step(model64, variables64, padded_batch, devices)
        np.testing.assert_allclose(metrics["loss"], padded_on_one[0]["loss"], rtol=LOSS_RTOL)
        return hlo

    return on


@pytest.mark.parametrize("devices", [1, 8])
def test_packed_train_step_equals_the_padded_step(
    devices, model64, variables64, packed_batch, padded_on_one, padded_hlo
):
    """Loss within relative 1e-12, gradients and BatchNorm buffers within 1e-10, on 1 and 8 devices; on 8 the
    packed step gathers no image or feature between devices that the padded step does not (each pair gather
    stays on its device)."""
    (metrics, grads, batch_stats), packed_hlo = run_step(model64, variables64, packed_batch, devices)
    expected_metrics, expected_grads, expected_stats = padded_on_one
    for name in ("loss", "cos_loss", "moe_loss"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=LOSS_RTOL, err_msg=name)
    assert_close_leaves(grads, expected_grads, GRAD_RTOL)
    assert_close_leaves(batch_stats, expected_stats, GRAD_RTOL)
    assert any(np.max(np.abs(g)) > 0 for g in jax.tree.leaves(grads["cmoe0"]))
    if devices > 1:
        assert " all-reduce" in packed_hlo  # the statistics over the global batch
        gathers, padded_gathers = activation_all_gathers(packed_hlo), activation_all_gathers(padded_hlo(devices))
        assert all(gathers.count(g) <= padded_gathers.count(g) for g in gathers), (gathers, padded_gathers)


def scores(model, variables, batch, devices: int) -> dict[str, np.ndarray]:
    """`evaluate.make_score_fn`'s maps and scores of `batch` on `devices`, as evaluation passes a batch."""
    mesh = mesh_of(devices)
    with jax.enable_x64(True):
        score_fn = evaluate.make_score_fn(model, mesh)
        inputs = sharding.to_global(batch, mesh, sharding.MODEL_KEYS)
        variables = jax.device_put(variables, sharding.replicated(mesh))
        pairs = packing.batch_pairs(inputs)
        return sharding.gather(score_fn(variables, inputs["specific_images"], inputs["modality_mask"], pairs))


@pytest.fixture(scope="module")
def padded_scores(model64, variables64, padded_batch):
    return scores(model64, variables64, padded_batch, 1)


def test_packed_maps_on_eight_devices_equal_the_padded_maps(model64, variables64, packed_batch, padded_scores):
    """Raw and blurred maps and image scores within relative 1e-10 of the padded batch's on 1 device."""
    packed, padded = scores(model64, variables64, packed_batch, 8), padded_scores
    assert padded["anomaly_map"].dtype == np.float64 and np.max(padded["anomaly_map_raw"]) > 0
    assert_close_leaves(packed, padded, GRAD_RTOL)
