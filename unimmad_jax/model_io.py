"""Model checkpoints: a model config and its variables, written atomically with orbax.

A folder holds `model_config` (JSON: the `ModelConfig` fields and what the folder is) and
`variables` (`params` and `batch_stats`).  `kind` is "model" for a complete model and
"prior" for the prior generator alone (the other parts are initialised from scratch).  The folder
may be local or on a cloud file system (`gs://...`, through `etils.epath`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from unimmad_jax.models.unimmad import ModelConfig

KINDS = ("model", "prior")


def _absolute(directory: epath.PathLike) -> epath.Path:
    """`directory` as orbax takes it: absolute (a cloud path is; `epath.Path.absolute` would prefix it)."""
    path = epath.Path(directory)
    return path if path.is_absolute() else path.absolute()


def save(
    directory: epath.PathLike, cfg: ModelConfig, variables: dict, kind: str = "model", processes: set[int] | None = None
) -> None:
    """Write `variables` (numpy or replicated arrays) and `cfg` into `directory`; `processes`: the processes that
    call it, process 0 among them; None for all (orbax waits for each of them)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    meta = {"kind": kind, "model": dataclasses.asdict(cfg)}
    options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes=processes)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options) as checkpointer:
        checkpointer.save(
            _absolute(directory),
            ocp.args.Composite(model_config=ocp.args.JsonSave(meta), variables=ocp.args.StandardSave(variables)),
            force=True,
        )


def load(directory: epath.PathLike) -> tuple[str, ModelConfig, dict]:
    """(kind, model config, variables as numpy arrays) of a folder written by `save`."""
    directory = _absolute(directory)
    if not (directory / "model_config").is_dir():
        raise FileNotFoundError(
            f"{directory}: not a model checkpoint (no model_config inside); "
            f"make one with `python -m unimmad_jax.convert`"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory, ocp.args.Composite(model_config=ocp.args.JsonRestore(), variables=ocp.args.StandardRestore())
        )
    meta = restored["model_config"]
    if meta["model"].get("dtype", "") is None:  # written when None meant float32
        del meta["model"]["dtype"]
    variables = jax.tree_util.tree_map(np.asarray, restored["variables"])
    return meta["kind"], ModelConfig.from_mapping(meta["model"]), variables


def check_compatible(loaded, expected, where: str) -> None:
    """Same tree and shapes, or an error naming `where` and the first parameter that differs."""
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    for path, value in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(path)
        if path not in flat_loaded:
            raise ValueError(f"{where}: has no {name}; the configured model needs it")
        if np.shape(flat_loaded[path]) != np.shape(value):
            shape = np.shape(flat_loaded[path])
            raise ValueError(f"{where}: {name} has shape {shape}, the configured model expects {np.shape(value)}")
