"""Data parallelism: one device mesh over all devices of all processes, batches split along it.

Parameters and optimizer state are replicated, or with `train.fsdp` split over the same axis
(each device holds a slice of every array; the step gathers the parameters where it uses them);
every batch array is split along its first axis.  `jax.jit` then computes BatchNorm statistics
and losses over the global batch, so a step gives the same result on 1 device or 256.  Each
process reads its own rows of every batch; what is written (logs, checkpoints' JSON, tables,
predictions) comes from process 0.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unimmad_jax.packing import PAIR_KEYS

DATA_AXIS = "data"
MODEL_KEYS = ("specific_images", "modality_mask", *PAIR_KEYS)
"""The batch fields the model reads (the pair fields only in packed batches, `unimmad_jax.packing`)."""
DEVICE_KEYS = (*MODEL_KEYS, "loss_weight")
"""The batch fields a train step reads; the others stay on the host."""
FSDP_MIN_BYTES = 2**14
"""Smaller arrays stay replicated with `train.fsdp`: biases and norm scales, 0.1 % of the full model's state
in two thirds of its arrays, would each cost a collective a step for next to no memory."""


def initialize_distributed(
    multihost: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join the other processes (`jax.distributed.initialize`) when asked, given a coordinator, or when
    JAX_COORDINATOR_ADDRESS is set.

    Arguments left None are detected from the cluster (TPU pods, SLURM, Open MPI); CPU processes
    exchange arrays through JAX's default CPU collectives (gloo).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if multihost or any(a is not None for a in explicit) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )


def is_main_process() -> bool:
    """Whether this process prints, shows progress and writes files: process 0 of any run."""
    return jax.process_index() == 0


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fsdp_split(shape: tuple[int, ...], devices: int) -> PartitionSpec:
    """An array's largest axis that splits evenly over `devices`, split over the data axis; none: replicated."""
    divisible = [axis for axis, size in enumerate(shape) if size >= devices and size % devices == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])
    return PartitionSpec(*(DATA_AXIS if a == axis else None for a in range(len(shape))))


def state_sharding(abstract_state, mesh: Mesh, fsdp: bool):
    """The sharding of each array of a train state (any pytree of arrays or `ShapeDtypeStruct`s, its
    static fields kept, so the result fits it as a jit argument): replicated, or with `fsdp`
    (`train.fsdp`) split along its largest evenly divisible axis (`fsdp_split`) when it holds at
    least `FSDP_MIN_BYTES`."""
    devices = mesh.devices.size

    def place(a) -> NamedSharding:
        if fsdp and a.size * a.dtype.itemsize >= FSDP_MIN_BYTES:
            return NamedSharding(mesh, fsdp_split(a.shape, devices))
        return replicated(mesh)

    return jax.tree_util.tree_map(place, abstract_state)


def placed(abstract, shardings):
    """`ShapeDtypeStruct`s of `abstract`'s arrays with `shardings` (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def traced_on(mesh: Mesh, fn):
    """`fn` traced with `mesh` in context: model code that splits its own work over the data axis
    (`layers.per_sample_conv`) finds it with `jax.sharding.get_abstract_mesh()`; without it, none."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def per_host_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """This host's share of a global batch; an error naming `field` if it does not divide evenly."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(f"{field}={global_batch_size} must be a multiple of the {devices} devices")
    return global_batch_size // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, keys=DEVICE_KEYS) -> dict[str, jax.Array]:
    """This host's rows of `keys` -> global arrays split over the mesh; the pair fields where the batch has them."""
    sharding = batch_split(mesh)
    keys = [k for k in keys if k in batch or k not in PAIR_KEYS]
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def gather(tree):
    """Global arrays (or this process's numpy rows) -> numpy arrays of all processes' rows, on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_text(strings: np.ndarray) -> np.ndarray:
    """This process's strings `[n]` (the same n on every process) -> all processes' strings, in process order."""
    if jax.process_count() == 1:
        return np.asarray(strings)
    encoded = [s.encode() for s in np.asarray(strings).tolist()]
    # Fixed-width bytes travel between processes; the width is the longest string of any process.
    width = max(1, int(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0))).max()))
    rows = np.asarray(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(encoded), width)
    gathered = multihost_utils.process_allgather(rows, tiled=True)
    return np.char.decode(np.ascontiguousarray(gathered).view(f"S{width}").reshape(-1), "utf-8")
