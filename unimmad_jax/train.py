"""The train state and the jitted training step: optimizer, schedule and initial weights.

All randomness derives from `config.seed`: the initial parameters here, the data draws in
`unimmad_jax.data.pipeline`.  The loop that runs the step is `unimmad_jax.loop`, its
checkpoints `unimmad_jax.checkpoints`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from unimmad_jax import model_io, sharding
from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models.layers import BATCH_NORM_MOMENTUM
from unimmad_jax.models.unimmad import FROZEN, UniMMAD, abstract_variables, init_variables


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def apply_gradients(self, grads, batch_stats) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Cosine annealing over epochs, constant within an epoch (PyTorch's CosineAnnealingLR stepped per epoch)."""
    per_epoch = optax.cosine_decay_schedule(config.optimizer.learning_rate, decay_steps=config.train.num_epochs)
    return lambda step: per_epoch(step // steps_per_epoch)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, params) -> optax.GradientTransformation:
    """Adam on the trained parts; the frozen prior gets no update and no optimizer state."""
    adam = optax.adam(
        learning_rate_schedule(config, steps_per_epoch),
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
    )
    labels = {name: "frozen" if name in FROZEN else "trained" for name in params}
    return optax.multi_transform({"trained": adam, "frozen": optax.set_to_zero()}, labels)


def prior_statistics(model: UniMMAD, variables: dict, images: np.ndarray) -> dict:
    """The prior's BatchNorm statistics measured on `images [n, H, W, 3]`.

    A random prior's BatchNorm layers hold mean 0, variance 1 and no shift, so they map an all-zero
    input (the normalised depth of a background) to all-zero features, whose direction the L2
    normalisation leaves undefined.  Statistics of real images make it a well-posed feature
    extractor; its weights stay random.
    """
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"]["prior"])
    start = {"params": variables["params"], "batch_stats": {**variables["batch_stats"], "prior": zeros}}
    _, updates = jax.jit(lambda v, x: model.apply(v, x, method=UniMMAD.prior_statistics, mutable=["batch_stats"]))(
        start, images
    )
    # One update from zero running statistics leaves (1 - momentum) times the batch's.
    return jax.tree_util.tree_map(lambda s: s / (1 - BATCH_NORM_MOMENTUM), updates["batch_stats"]["prior"])


def initial_variables(model: UniMMAD, config: ml_collections.ConfigDict, prior_images: np.ndarray) -> dict:
    """The variables training starts from.

    `train.init_from` names a whole model (all of it is loaded) or a prior; otherwise the prior has
    random weights (from the seed) and BatchNorm statistics measured on `prior_images`.  The
    general encoder starts as a copy of the prior (docs/model.md#prior-and-general-encoder); the other parts are random.
    """
    variables = init_variables(model, config.seed, slots=config.data.num_slots)
    source = config.train.init_from
    if source:
        kind, _, loaded = model_io.load(source)
        if kind == "model":
            model_io.check_compatible(loaded, variables, f"train.init_from={source}")
            return loaded
        model_io.check_compatible(
            loaded, {c: {"prior": variables[c]["prior"]} for c in variables}, f"train.init_from={source}"
        )
        variables = {c: {**variables[c], "prior": loaded[c]["prior"]} for c in variables}
    else:
        variables["batch_stats"]["prior"] = prior_statistics(model, variables, prior_images)
    return {c: {**variables[c], "encoder": jax.tree_util.tree_map(jnp.copy, variables[c]["prior"])} for c in variables}


def create_train_state(
    model: UniMMAD, config: ml_collections.ConfigDict, steps_per_epoch: int, variables: dict
) -> TrainState:
    """Step 0 at `variables`, with a fresh optimizer state and schedule."""
    params = variables["params"]
    tx = make_optimizer(config, steps_per_epoch, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        tx=tx,
    )


def abstract_train_state(model: UniMMAD, config: ml_collections.ConfigDict, steps_per_epoch: int) -> TrainState:
    """The shapes and dtypes of `create_train_state`'s result, computing and reading nothing: what a
    restore needs, so that resuming skips initialising, loading `train.init_from` and measuring the prior."""
    variables = abstract_variables(model.config, slots=config.data.num_slots)
    params = variables["params"]
    tx = make_optimizer(config, steps_per_epoch, params)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=jax.eval_shape(tx.init, params),
        tx=tx,
    )


def train_step(
    model: UniMMAD, loss_cfg: LossConfig, state: TrainState, batch: dict[str, jax.Array], epoch: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a (global) batch; BatchNorm statistics are the batch's."""

    def loss_fn(params):
        # Whole parameters for the layers: split ones (`train.fsdp`) are gathered here, where XLA's
        # partitioner would otherwise split the layers' channels and move activations between devices.
        params = jax.lax.with_sharding_constraint(params, PartitionSpec())
        out, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["specific_images"],
            batch["modality_mask"],
            train=True,
            mutable=["batch_stats"],
        )
        loss, parts = total_loss(out, batch["loss_weight"], epoch, loss_cfg)
        return loss, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, batch_stats), {"loss": loss, **parts}


def state_sharding(state: TrainState, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """Where each array of `state` (arrays or `ShapeDtypeStruct`s) lives on `mesh`: replicated, or split
    with `train.fsdp`.  The shardings carry `state`'s optimizer, so they fit `state` alone as a jit argument."""
    return sharding.state_sharding(state, mesh, config.train.fsdp)


def make_train_step(model: UniMMAD, loss_cfg: LossConfig, mesh: Mesh, placement: TrainState | None = None):
    """`train_step` compiled for the mesh: the state placed as `placement` says (`state_sharding`; None:
    replicated), the batch split over the devices."""
    replicated, split = sharding.replicated(mesh), sharding.batch_split(mesh)
    placement = replicated if placement is None else placement
    return jax.jit(
        functools.partial(sharding.traced_on(mesh, train_step), model, loss_cfg),
        in_shardings=(placement, split, replicated),
        out_shardings=(placement, replicated),
        donate_argnums=0,
    )
