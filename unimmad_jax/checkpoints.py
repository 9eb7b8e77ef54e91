"""Orbax checkpoints of a training run: the train state's writes and restores, and its variables alone.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state`, the train state (`step`,
`params`, `batch_stats`, `opt_state`), and `meta`, a JSON record (epoch, step, steps per epoch,
seed, config, metrics).  The data position is the step itself (`TrainLoader.seek`), so a
checkpoint resumes on any number of processes and devices: arrays are restored into the mesh the
caller gives.  The workdir may be local or on a cloud file system (`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

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


def _restore(manager: ocp.CheckpointManager, step: int, **items: ocp.args.CheckpointArgs) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"checkpoint {manager.directory / str(step)} does not fit the configured model "
            f"(was it written with another config?): {error}"
        ) from error


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict] | None:
    """The latest complete checkpoint's state and JSON record, or None.

    `target` gives the structure, shapes, dtypes and shardings (`ShapeDtypeStruct`s, `sharding.placed`):
    a checkpoint restores into any of them, whatever mesh and sharding wrote it."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = _restore(manager, step, state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    return restored["state"], restored["meta"]


def save(manager: ocp.CheckpointManager, state: Any, meta: dict, metrics: dict | None) -> None:
    """Checkpoint `state` at step `meta["step"]` (a host value: saving never waits for the device)."""
    manager.save(
        meta["step"],
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
    )


def is_training_workdir(path: epath.PathLike) -> bool:
    """Whether `path` is a training run's workdir (it has a `checkpoints` folder)."""
    return (workdir_path(path) / "checkpoints").is_dir()


def restore_variables(workdir: epath.PathLike, step: int, target: dict) -> dict:
    """`params` and `batch_stats` of the train state checkpointed at `step` in `workdir`, and nothing else:
    the optimizer state and step stay unread (a partial restore).

    `target` (`{"params": ..., "batch_stats": ...}` of `ShapeDtypeStruct`s with shardings, `sharding.placed`)
    gives the shapes, dtypes and placement, whatever mesh and sharding wrote the checkpoint."""
    state = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    with ocp.CheckpointManager(workdir_path(workdir) / "checkpoints", item_names=ITEMS) as manager:
        return _restore(manager, step, state=state)["state"]


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
