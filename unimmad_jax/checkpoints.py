"""Orbax checkpoints of a training run: write, resume, and the variables to evaluate or predict with.

A checkpoint `<workdir>/checkpoints/<step>/` holds the train state (step, parameters, BatchNorm
statistics, optimizer state) and a JSON record (epoch, step, steps per epoch, seed, config,
metrics).  The data position is the step itself (`TrainLoader.seek`), so a checkpoint resumes
on any number of processes and devices: arrays are restored into the mesh the run configures.
The workdir may be local or on a cloud file system (`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh
from orbax.checkpoint.checkpoint_managers import preservation_policy

from unimmad_jax import model_io, sharding
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import UniMMAD, abstract_variables
from unimmad_jax.train import TrainState, abstract_train_state

ITEMS = ("state", "meta")


def workdir_path(workdir: epath.PathLike) -> epath.Path:
    """`workdir` as an absolute `epath.Path`: a local folder, or a cloud one such as `gs://bucket/run`."""
    path = epath.Path(workdir)
    return path if path.is_absolute() else path.absolute()


def checkpoint_manager(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
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
    return ocp.CheckpointManager(workdir_path(workdir) / "checkpoints", item_names=ITEMS, options=options)


def _restore(manager: ocp.CheckpointManager, step: int, target: TrainState) -> dict:
    try:
        return manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"checkpoint {manager.directory / str(step)} does not fit the configured model "
            f"(was it written with another config?): {error}"
        ) from error


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> tuple[TrainState, dict] | None:
    """The latest complete checkpoint's state and JSON record, or None.

    `target` gives the structure, shapes, dtypes and shardings (`ShapeDtypeStruct`s, `sharding.placed`):
    a checkpoint restores into any of them, whatever mesh and sharding wrote it."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = _restore(manager, step, target)
    return restored["state"], restored["meta"]


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict, metrics: dict | None) -> None:
    """Checkpoint `state` at step `meta["step"]` (a host value: saving never waits for the device)."""
    manager.save(
        meta["step"],
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
    )


def is_training_workdir(path: epath.PathLike) -> bool:
    """Whether `path` is a training run's workdir (it has a `checkpoints` folder)."""
    return (workdir_path(path) / "checkpoints").is_dir()


def trained_variables(config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh: Mesh) -> dict:
    """The variables to evaluate or predict with, on `mesh` (whatever mesh wrote them): the latest
    checkpoint in `workdir`, else `train.init_from` (a training workdir or a complete model)."""
    checkpoints = workdir_path(workdir) / "checkpoints"
    model = UniMMAD(model_config(config))
    if checkpoints.is_dir():
        with ocp.CheckpointManager(checkpoints, item_names=ITEMS) as manager:
            step = manager.latest_step()
            if step is not None:
                abstract = abstract_train_state(model, config, steps_per_epoch=1)
                target = sharding.placed(abstract, sharding.state_sharding(abstract, mesh, fsdp=False))
                state = _restore(manager, step, target)["state"]
                return {"params": state.params, "batch_stats": state.batch_stats}
    source = config.train.init_from
    if source and workdir_path(source) != workdir_path(workdir) and is_training_workdir(source):
        return trained_variables(config, source, mesh)
    if source:
        kind, _, variables = model_io.load(source)
        if kind == "model":
            expected = abstract_variables(model.config, slots=config.data.num_slots)
            model_io.check_compatible(variables, expected, f"train.init_from={source}")
            return jax.device_put(variables, sharding.replicated(mesh))
    raise FileNotFoundError(
        f"no checkpoint in {checkpoints} and no complete model or training workdir in train.init_from: "
        f"train first, or convert a released model with `python -m unimmad_jax.convert`"
    )


def latest_record(workdir: epath.PathLike) -> tuple[int, dict] | None:
    """The step and JSON record (epoch, step, config, ...) of the latest checkpoint in `workdir`, or None."""
    directory = workdir_path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory, item_names=ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
