"""Orbax checkpoints of a training run: the train state's writes and restores, and its variables alone.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state`, the train state (`step`,
`params`, `batch_stats`, `opt_state`), and `meta`, a JSON record (epoch, step, steps per epoch,
seed, config, metrics).  The data position is the step itself (`TrainLoader.seek`), so a
checkpoint resumes on any number of processes and devices: arrays are restored into the mesh the
caller gives.  The workdir may be local or on a cloud file system (`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

ITEMS = ("state", "meta")
DAMAGED_FOLDER = "checkpoints_damaged"
"""Where training moves the checkpoints it cannot read, beside `checkpoints/`."""
T = TypeVar("T")


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


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read (a file missing, truncated or unreadable)."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params/encoder/conv/kernel": shape}` of the array leaves of `tree` (a target or orbax's metadata)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        shapes["/".join(names)] = tuple(leaf.shape)
    return shapes


def _check_fits(path: epath.Path, saved: Any, target: Any, partial: bool) -> None:
    """A ValueError naming the fields where the checkpoint at `path` (its state's metadata `saved`) and `target`
    differ: the checkpoint reads, but another config wrote it.  `partial`: `target` is a part of the state."""
    saved, wanted = _leaf_shapes(saved), _leaf_shapes(target)
    problems = [f"{name}: not in the checkpoint" for name in wanted if name not in saved]
    if not partial:
        problems += [f"{name}: not in the configured model" for name in saved if name not in wanted]
    problems += [
        f"{name}: {saved[name]} in the checkpoint, {shape} configured"
        for name, shape in wanted.items()
        if name in saved and saved[name] != shape
    ]
    if problems:
        listed = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"checkpoint {path} does not fit the configured model (was it written with another config?): {listed}"
        )


def _restore(manager: ocp.CheckpointManager, step: int, target: Any, partial: bool = False) -> dict:
    """The checkpoint at `step`: its `state` read into `target` (`partial`: the part of the state `target` has)
    and its JSON record `meta`.  A checkpoint that reads but does not fit `target` is a ValueError; one that
    cannot be read, a `DamagedCheckpoint`."""
    path = manager.directory / str(step)
    try:
        saved = ocp.StandardCheckpointHandler().metadata(path / "state")
    except Exception as error:  # orbax and TensorStore raise plain Exceptions for unreadable files
        raise DamagedCheckpoint(f"{path}: {_first_line(error)}") from error
    _check_fits(path, saved, target, partial)
    if partial:
        state = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
    else:
        state = ocp.args.StandardRestore(target)
    try:
        return manager.restore(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore()))
    except Exception as error:  # its tree fits `target`: what fails is reading the files
        raise DamagedCheckpoint(f"{path}: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    """The gist of `error`: its first line, without TensorStore's spec dump."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(" See full TensorStore details")[0][:300]


def newest_readable(
    manager: ocp.CheckpointManager, read: Callable[[int], T], move_damaged: bool = False
) -> tuple[int, T] | None:
    """`(step, read(step))` of the newest checkpoint `read` gets through; None without checkpoints.

    The damaged checkpoints after it are named in a warning and, with `move_damaged` (training, which
    writes after them), moved to `<workdir>/checkpoints_damaged/` by process 0: nothing is deleted.
    With none readable, a FileNotFoundError names the folder and nothing moves."""
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            result = read(step)
        except DamagedCheckpoint as error:
            damaged.append((step, error))
            continue
        for bad, error in damaged:
            _warn(f"checkpoint step {bad} cannot be read ({error}); using step {step}")
        if move_damaged and damaged:
            _move_aside(manager, [bad for bad, _ in damaged])
        return step, result
    if damaged:
        listed = "; ".join(f"step {bad}: {error}" for bad, error in damaged)
        raise FileNotFoundError(f"no checkpoint in {manager.directory} can be read: {listed}")
    return None


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move the checkpoints of `steps` to `<workdir>/checkpoints_damaged/<step>` (`<step>_<n>` if taken)."""
    aside = manager.directory.parent / DAMAGED_FOLDER
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            destination, n = aside / str(step), 1
            while destination.exists():
                destination, n = aside / f"{step}_{n}", n + 1
            (manager.directory / str(step)).rename(destination)
            _warn(f"moved the damaged checkpoint step {step} to {destination}")
    multihost_utils.sync_global_devices("damaged checkpoints moved")
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict] | None:
    """The newest readable checkpoint's state and JSON record, or None without checkpoints; damaged
    checkpoints after it are moved aside (`newest_readable`).

    `target` gives the structure, shapes, dtypes and shardings (`ShapeDtypeStruct`s, `sharding.placed`):
    a checkpoint restores into any of them, whatever mesh and sharding wrote it."""
    newest = newest_readable(manager, lambda step: _restore(manager, step, target), move_damaged=True)
    if newest is None:
        return None
    restored = newest[1]
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


def newest_variables(workdir: epath.PathLike, target: Callable[[dict], dict]) -> tuple[int, dict, dict] | None:
    """`(step, record, variables)` of the newest readable checkpoint in `workdir` (damaged ones after it are
    named in a warning and left where they are), or None without checkpoints: its `params` and `batch_stats`
    alone, the optimizer state unread (a partial restore).

    `target(record)` (`{"params": ..., "batch_stats": ...}` of `ShapeDtypeStruct`s with shardings, `sharding.placed`,
    for the checkpoint's JSON record) gives the shapes, dtypes and placement, whatever mesh and sharding wrote it."""
    directory = workdir_path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory, item_names=ITEMS) as manager:

        def read(step: int) -> tuple[dict, dict]:
            try:
                record = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as error:  # a missing or unreadable JSON record
                raise DamagedCheckpoint(f"{directory / str(step)}: {_first_line(error)}") from error
            return record, _restore(manager, step, target(record), partial=True)["state"]

        newest = newest_readable(manager, read)
    if newest is None:
        return None
    step, (record, variables) = newest
    return step, record, variables
