"""Where the train state lives: `train.fsdp` splits each array along its largest evenly divisible axis."""

import jax
import numpy as np
from helpers import load_config
from jax.sharding import Mesh, PartitionSpec

from unimmad_jax import checkpoints, sharding, train
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import UniMMAD


def test_fsdp_splits_the_largest_evenly_divisible_axis():
    assert sharding.fsdp_split((3, 3, 64, 256), 8) == PartitionSpec(None, None, None, sharding.DATA_AXIS)
    assert sharding.fsdp_split((1024, 24), 8) == PartitionSpec(sharding.DATA_AXIS, None)
    assert sharding.fsdp_split((6, 12, 5), 4) == PartitionSpec(None, sharding.DATA_AXIS, None)
    assert sharding.fsdp_split((), 8) == PartitionSpec()
    assert sharding.fsdp_split((3, 4), 8) == PartitionSpec()


def tiny_abstract_state(config):
    return train.abstract_train_state(UniMMAD(model_config(config)), config, steps_per_epoch=1)


def test_fsdp_state_holds_each_array_once_over_the_devices():
    config = load_config("tiny")
    mesh = Mesh(np.asarray(jax.devices()[:8]), (sharding.DATA_AXIS,))
    abstract = tiny_abstract_state(config)
    leaves = jax.tree_util.tree_leaves(abstract)

    def held_per_device(fsdp: bool) -> int:
        config.train.fsdp = fsdp
        shardings = jax.tree_util.tree_leaves(sharding.state_sharding(abstract, mesh, fsdp))
        assert len(shardings) == len(leaves)
        return sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shardings))

    total = sum(a.size * a.dtype.itemsize for a in leaves)
    small = sum(a.size * a.dtype.itemsize for a in leaves if a.size * a.dtype.itemsize < sharding.FSDP_MIN_BYTES)
    assert held_per_device(False) == total
    assert held_per_device(True) == small + (total - small) // 8  # every larger array of the tiny model splits


def test_checkpoints_move_between_split_and_replicated_states(tmp_path):
    """A checkpoint of a state split over 8 devices resumes replicated on 1, and back."""
    config = load_config("tiny")
    rng = np.random.default_rng(0)
    values = {
        "kernel": rng.standard_normal((3, 3, 16, 64)).astype(np.float32),  # 36 KiB: split
        "bias": rng.standard_normal(64).astype(np.float32),  # replicated
        "step": np.int32(7),
    }
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), values)
    meshes = {n: Mesh(np.asarray(jax.devices()[:n]), (sharding.DATA_AXIS,)) for n in (1, 8)}

    def placement(devices: int, fsdp: bool):
        return sharding.state_sharding(abstract, meshes[devices], fsdp)

    assert placement(8, True)["kernel"].spec == PartitionSpec(None, None, None, sharding.DATA_AXIS)
    for step, (written, read) in enumerate((((8, True), (1, False)), ((1, False), (8, True))), start=1):
        state = jax.device_put(values, placement(*written))
        with checkpoints.checkpoint_manager(tmp_path / str(step), config) as manager:
            checkpoints.save(manager, state, {"step": step}, None)
            manager.wait_until_finished()
            restored, meta = checkpoints.restore_latest(manager, sharding.placed(abstract, placement(*read)))
        assert meta == {"step": step}
        assert jax.tree_util.tree_map(lambda a: a.sharding, restored) == placement(*read)
        for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(values)):
            np.testing.assert_array_equal(a, b)
