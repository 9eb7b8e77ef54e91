"""Training: the train state, the jitted step, the epoch loop with evaluation and orbax checkpoints.

A checkpoint (one per `train.checkpoint_every_epochs`, written atomically by orbax) holds the
train state (step, parameters, BatchNorm statistics, optimizer state), the grain iterator
state and a JSON record of the epoch, seed and metrics.  All randomness derives from
`config.seed`: the initial parameters, and the data draws (from the seed and the epoch,
positioned by the iterator state), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import flax.struct
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from orbax.checkpoint.checkpoint_managers import preservation_policy
from tqdm import tqdm

from unimmad_jax import evaluate, metrics, model_io, sharding
from unimmad_jax.config import loss_config, model_config
from unimmad_jax.data import prepare, train_loader
from unimmad_jax.data.prepared import find_prepared
from unimmad_jax.losses import LossConfig, total_loss
from unimmad_jax.models.layers import BATCH_NORM_MOMENTUM
from unimmad_jax.models.unimmad import FROZEN, UniMMAD, abstract_variables, init_variables

BUILT_IN_DATASETS = ("synthetic",)
"""Datasets prepared on the fly when missing: they need no download."""


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


def _check_compatible(loaded, expected, where: str) -> None:
    """Same tree and shapes, or an error naming the first parameter that differs."""
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    for path, value in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(path)
        if path not in flat_loaded:
            raise ValueError(f"{where}: has no {name}; the configured model needs it")
        if np.shape(flat_loaded[path]) != np.shape(value):
            raise ValueError(
                f"{where}: {name} has shape {np.shape(flat_loaded[path])}, "
                f"the configured model expects {np.shape(value)}"
            )


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
    general encoder starts as a copy of the prior (SPEC 2.2); the other parts are random.
    """
    variables = init_variables(model, config.seed, slots=config.data.num_slots)
    source = config.train.init_from
    if source:
        kind, _, loaded = model_io.load(source)
        if kind == "model":
            _check_compatible(loaded, variables, f"train.init_from={source}")
            return loaded
        _check_compatible(loaded, {c: {"prior": variables[c]["prior"]} for c in variables}, f"train.init_from={source}")
        variables = {c: {**variables[c], "prior": loaded[c]["prior"]} for c in variables}
    else:
        variables["batch_stats"]["prior"] = prior_statistics(model, variables, prior_images)
    return {c: {**variables[c], "encoder": jax.tree_util.tree_map(jnp.copy, variables[c]["prior"])} for c in variables}


def create_train_state(
    model: UniMMAD, config: ml_collections.ConfigDict, steps_per_epoch: int, prior_images: np.ndarray
) -> TrainState:
    variables = initial_variables(model, config, prior_images)
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


def first_images(config: ml_collections.ConfigDict, batch_size: int) -> np.ndarray:
    """The valid modality images `[n, H, W, 3]` of the first training batch's first `batch_size` samples.

    Every host reads the same ones (so every host starts from the same variables); the training
    loader is not advanced.
    """
    loader = train_loader(config.data, seed=config.seed, batch_size=batch_size, process_index=0, process_count=1)
    batch = next(loader.iterator)
    return batch["specific_images"][batch["modality_mask"]]


def train_step(
    model: UniMMAD, loss_cfg: LossConfig, state: TrainState, batch: dict[str, jax.Array], epoch: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a (global) batch; BatchNorm statistics are the batch's."""

    def loss_fn(params):
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


def make_train_step(model: UniMMAD, loss_cfg: LossConfig, mesh: Mesh):
    replicated, split = sharding.replicated(mesh), sharding.batch_split(mesh)
    return jax.jit(
        functools.partial(train_step, model, loss_cfg),
        in_shardings=(replicated, split, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Keeps the last `train.keep_checkpoints` and the best by `train.best_metric`; writes are atomic."""
    best_metric = config.train.best_metric
    policy = preservation_policy.AnyPreservationPolicy(
        [
            preservation_policy.LatestN(n=config.train.keep_checkpoints),
            preservation_policy.BestN(
                get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
    return ocp.CheckpointManager(
        workdir.absolute() / "checkpoints", item_names=("state", "data", "meta"), options=options
    )


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, iterator, mesh: Mesh):
    """The latest complete checkpoint (state placed on `mesh`, iterator positioned), or None.

    `state` gives the structure, shapes and dtypes (its arrays or `ShapeDtypeStruct`s)."""
    step = manager.latest_step()
    if step is None:
        return None
    replicated = sharding.replicated(mesh)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"checkpoint {manager.directory / str(step)} does not fit the configured model or data "
            f"(was it written with another config?): {error}"
        ) from error
    return restored["state"], restored["meta"]


class Logger:
    """Scalars to TensorBoard and, one JSON object a line, to `metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: Path):
        self.writer = self.lines = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))
            self.lines = open(workdir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.lines.write(json.dumps({"step": step, **values}) + "\n")
        self.lines.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.lines.close()


def ensure_prepared(config: ml_collections.ConfigDict) -> None:
    """Prepare the built-in datasets when missing; the others must have been prepared by the user."""
    prepared = find_prepared(config.data.data_dir)
    for name in config.data.datasets:
        if name not in prepared and name in BUILT_IN_DATASETS and jax.process_index() == 0:
            print(f"Preparing the built-in {name} dataset in {config.data.data_dir} (once).")
            prepare(name, config.data.data_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("datasets prepared")


def run_evaluation(model, state: TrainState, config, mesh, workdir: Path, logger: Logger, epoch: int) -> dict:
    summary = evaluate.evaluate(model, {"params": state.params, "batch_stats": state.batch_stats}, config, mesh)
    if jax.process_index() == 0:
        print(f"\nEvaluation after epoch {epoch}:\n{metrics.to_text(summary)}")
        evaluate.write_summary(summary, workdir / "eval", f"epoch_{epoch:04d}")
        logger.scalars(int(state.step), {f"eval/{k}": v for k, v in evaluate.flat_scalars(summary).items()})
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train for `train.num_epochs` epochs, resuming from the latest checkpoint in `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.data_mesh()
    model = UniMMAD(model_config(config))
    loss_cfg = loss_config(config)
    ensure_prepared(config)
    batch_size = sharding.per_host_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    loader = train_loader(config.data, seed=config.seed, batch_size=batch_size)
    steps_per_epoch = loader.steps_per_epoch

    manager = checkpoint_manager(workdir, config)
    restored = restore_latest(manager, abstract_train_state(model, config, steps_per_epoch), loader.iterator, mesh)
    if restored is not None:
        state, meta = restored
        if meta["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"the checkpoints in {workdir} were written with {meta['steps_per_epoch']} steps per "
                f"epoch, the configured data gives {steps_per_epoch}: resume with the same data config"
            )
        print(f"Resumed from step {int(state.step)} (epoch {meta['epoch']}) in {manager.directory}")
    else:
        state = jax.device_put(
            create_train_state(model, config, steps_per_epoch, first_images(config, batch_size)),
            sharding.replicated(mesh),
        )
        if not config.train.init_from:
            print(
                "Training from randomly initialised weights, the prior too (its BatchNorm statistics measured "
                "on a training batch): without pretrained prior weights (train.init_from) the features are not "
                "ImageNet features."
            )

    step_fn = make_train_step(model, loss_cfg, mesh)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    logger = Logger(workdir)
    start_epoch = int(state.step) // steps_per_epoch
    for epoch in range(start_epoch, config.train.num_epochs):
        state = _train_epoch(state, step_fn, loader, epoch, steps_per_epoch, schedule, mesh, logger, config)
        done = epoch + 1
        summary = None
        if done % config.train.eval_every_epochs == 0 or done == config.train.num_epochs:
            summary = run_evaluation(model, state, config, mesh, workdir, logger, done)
        if done % config.train.checkpoint_every_epochs == 0 or done == config.train.num_epochs:
            _save(manager, state, loader.iterator, done, steps_per_epoch, config, summary)
    manager.wait_until_finished()
    manager.close()
    logger.close()
    return state


def _train_epoch(state, step_fn, loader, epoch, steps_per_epoch, schedule, mesh, logger, config) -> TrainState:
    bar = tqdm(
        range(steps_per_epoch),
        desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    epoch_array = jnp.asarray(epoch, jnp.int32)
    start, images = time.perf_counter(), 0
    for _ in bar:
        batch = sharding.to_global(next(loader.iterator), mesh)
        state, step_metrics = step_fn(state, batch, epoch_array)
        images += config.train.batch_size
        step = int(state.step)
        if step % config.train.log_every_steps == 0 or step % steps_per_epoch == 0:
            values = {k: float(v) for k, v in step_metrics.items()}
            values["learning_rate"] = float(schedule(step - 1))
            values["images_per_s"] = images / (time.perf_counter() - start)
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"the loss is {values['loss']} at step {step} (epoch {epoch + 1})")
            bar.set_postfix(
                loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}", img_s=f"{values['images_per_s']:.1f}"
            )
            logger.scalars(step, {f"train/{k}": v for k, v in values.items()})
    return state


def _save(manager, state, iterator, epoch, steps_per_epoch, config, summary) -> None:
    flat = evaluate.flat_scalars(summary) if summary is not None else None
    if flat is not None and config.train.best_metric not in flat:
        raise ValueError(
            f"train.best_metric={config.train.best_metric!r} is not an evaluation metric; choose one of {sorted(flat)}"
        )
    meta = {
        "epoch": epoch,
        "step": int(state.step),
        "steps_per_epoch": steps_per_epoch,
        "seed": config.seed,
        "config": config.to_dict(),
        "metrics": flat,
    }
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=flat,
    )


def trained_variables(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """The variables to evaluate or predict with: the latest checkpoint in `workdir`, else `train.init_from`."""
    checkpoints = Path(workdir).absolute() / "checkpoints"
    expected = abstract_variables(model_config(config), slots=config.data.num_slots)
    if checkpoints.is_dir():
        with ocp.CheckpointManager(checkpoints, item_names=("state", "data", "meta")) as manager:
            step = manager.latest_step()
            if step is not None:
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
                variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
                _check_compatible(variables, expected, f"checkpoint {checkpoints / str(step)}")
                return variables
    if config.train.init_from:
        kind, _, variables = model_io.load(config.train.init_from)
        if kind == "model":
            _check_compatible(variables, expected, f"train.init_from={config.train.init_from}")
            return variables
    raise FileNotFoundError(
        f"no checkpoint in {checkpoints} and no complete model in train.init_from: "
        f"train first, or convert a released model with `python -m unimmad_jax.convert`"
    )
