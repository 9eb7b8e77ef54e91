"""The train state and the jitted training step: optimizer and schedule.

The variables a run starts from come from `unimmad_jax.weights`; the loop that runs the step is
`unimmad_jax.loop`, its checkpoints `unimmad_jax.checkpoints`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec

from unimmad_jax import packing, sharding
from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models.unimmad import FROZEN, UniMMAD, abstract_variables


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
    restore needs, so that resuming skips the starting variables (`weights.starting_variables`)."""
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
    """One optimizer step on a (global) batch; BatchNorm statistics are the batch's.

    A packed batch (`unimmad_jax.packing`) runs the model on its pairs, another on every slot: the same step.
    """

    def loss_fn(params):
        # Whole parameters for the layers: split ones (`train.fsdp`) are gathered here, where XLA's
        # partitioner would otherwise split the layers' channels and move activations between devices.
        params = jax.lax.with_sharding_constraint(params, PartitionSpec())
        out, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["specific_images"],
            batch["modality_mask"],
            train=True,
            pairs=packing.batch_pairs(batch),
            mutable=["batch_stats"],
        )
        loss, parts = total_loss(out, batch["loss_weight"], epoch, loss_cfg)
        return loss, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, batch_stats), {"loss": loss, **parts}


def abstract_batch(
    config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int, pair_budget: int | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of a train step's batch (`sharding.DEVICE_KEYS`): packed to `pair_budget`
    pairs per device (`unimmad_jax.packing`), or, with None, every slot computed."""
    split = sharding.batch_split(mesh)
    size, slots = config.image_size, config.data.num_slots
    batch = {
        "specific_images": jax.ShapeDtypeStruct((global_batch, slots, size, size, 3), jnp.float32, sharding=split),
        "modality_mask": jax.ShapeDtypeStruct((global_batch, slots), jnp.bool_, sharding=split),
        "loss_weight": jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=split),
    }
    if pair_budget is not None:
        pairs = (mesh.shape[sharding.DATA_AXIS], pair_budget)
        for key, dtype in zip(packing.PAIR_KEYS, (jnp.int32, jnp.int32, jnp.bool_)):
            batch[key] = jax.ShapeDtypeStruct(pairs, dtype, sharding=split)
    return batch


def make_train_step(model: UniMMAD, loss_cfg: LossConfig, mesh: Mesh, placement: TrainState | None = None):
    """`train_step` compiled for the mesh: the state placed as `placement` says (`sharding.state_sharding`;
    None: replicated), the batch split over the devices."""
    replicated, split = sharding.replicated(mesh), sharding.batch_split(mesh)
    placement = replicated if placement is None else placement
    return jax.jit(
        functools.partial(sharding.traced_on(mesh, train_step), model, loss_cfg),
        in_shardings=(placement, split, replicated),
        out_shardings=(placement, replicated),
        donate_argnums=0,
    )
