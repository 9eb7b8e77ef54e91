"""Data parallelism: one device mesh over all devices of all hosts, batches split along it.

Parameters and optimizer state are replicated; every batch array is split along its first
axis.  `jax.jit` then computes BatchNorm statistics and losses over the global batch, so a
step gives the same result on 1 device or 256.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
DEVICE_KEYS = ("specific_images", "modality_mask", "loss_weight")
"""The batch fields a train step reads; the others stay on the host."""


def initialize_distributed(multihost: bool) -> None:
    """Join the other hosts (`jax.distributed`) when asked or when a coordinator is configured."""
    if multihost or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_host_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """This host's share of a global batch; an error naming `field` if it does not divide evenly."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(f"{field}={global_batch_size} must be a multiple of the {devices} devices")
    return global_batch_size // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, keys=DEVICE_KEYS) -> dict[str, jax.Array]:
    """This host's rows of `keys` -> global arrays split over the mesh."""
    sharding = batch_split(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def gather(tree):
    """Global arrays (or this host's numpy rows) -> numpy arrays of all hosts' rows, on every host."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
