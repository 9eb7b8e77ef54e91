"""Every source of weights (`unimmad_jax.weights`): checkpoints read without their optimizer state, each
case of `train.init_from`, for training and for evaluation, and a prior of `train.prior` from a file or folder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from helpers import load_config
from jax.sharding import Mesh

from unimmad_jax import checkpoints, convert, model_io, pretrained, sharding, train, weights
from unimmad_jax.config import model_config
from unimmad_jax.models.unimmad import UniMMAD, abstract_variables, init_variables


def mesh_of(devices: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:devices]), (sharding.DATA_AXIS,))


def random_numpy_variables(config, seed: int) -> dict:
    """Variables of the configured model's shapes, each leaf distinct: a mix-up of two leaves shows."""
    rng = np.random.default_rng(seed)
    abstract = abstract_variables(model_config(config), slots=config.data.num_slots)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def assert_same(ours, theirs) -> None:
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def write_checkpoint(workdir, config, variables: dict, opt_state, step: int = 12, placement=None) -> None:
    """A checkpoint of a train state at `variables`, whatever `opt_state` it is given, on `placement` (None:
    the default device)."""
    tx = train.make_optimizer(config, 1, variables["params"])
    state = train.TrainState(jnp.int32(step), variables["params"], variables["batch_stats"], opt_state, tx)
    if placement is not None:
        state = jax.device_put(state, placement(state))
    with checkpoints.checkpoint_manager(workdir, config) as manager:
        checkpoints.save(manager, state, {"step": step, "config": config.to_dict()}, None)


@pytest.fixture
def config():
    return load_config("tiny")


def test_checkpoint_variables_leave_the_optimizer_state_unread(tmp_path, config):
    """A checkpoint whose optimizer state fits no configured optimizer (other shapes, another tree): restoring the
    train state fails on it, reading the variables never touches it.  Written split over 8 devices (`train.fsdp`),
    read replicated on 1 and on 2."""
    variables = random_numpy_variables(config, seed=1)
    foreign = {"momentum": np.arange(7, dtype=np.float32), "count": np.int32(3)}
    write_checkpoint(
        tmp_path, config, variables, foreign, placement=lambda s: sharding.state_sharding(s, mesh_of(8), fsdp=True)
    )
    abstract = train.abstract_train_state(UniMMAD(model_config(config)), config, steps_per_epoch=1)
    with checkpoints.checkpoint_manager(tmp_path, config) as manager:
        with pytest.raises(ValueError, match="does not fit the configured model"):
            checkpoints.restore_latest(
                manager, sharding.placed(abstract, sharding.state_sharding(abstract, mesh_of(1), False))
            )
    for devices in (1, 2):
        mesh = mesh_of(devices)
        step, _, restored = weights.newest_checkpoint_variables(config, tmp_path, mesh)
        assert step == 12
        assert set(restored) == {"params", "batch_stats"}
        assert_same(restored, variables)
        assert all(leaf.sharding == sharding.replicated(mesh) for leaf in jax.tree_util.tree_leaves(restored))


def test_evaluated_variables_are_the_latest_checkpoint_else_a_complete_model_of_init_from(tmp_path, config):
    mesh = mesh_of(1)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* and no complete model"):
        weights.evaluated_variables(config, tmp_path / "empty", mesh)
    model = random_numpy_variables(config, seed=2)
    model_io.save(tmp_path / "model", model_config(config), model)
    config.train.init_from = str(tmp_path / "model")
    assert_same(weights.evaluated_variables(config, tmp_path / "run", mesh), model)

    trained = random_numpy_variables(config, seed=3)
    write_checkpoint(tmp_path / "run", config, trained, opt_state={})
    assert_same(weights.evaluated_variables(config, tmp_path / "run", mesh), trained)
    config.train.init_from = str(tmp_path / "run")  # a training workdir: its latest checkpoint
    assert_same(weights.evaluated_variables(config, tmp_path / "next", mesh), trained)

    prior = {c: {"prior": model[c]["prior"]} for c in model}
    model_io.save(tmp_path / "prior", model_config(config), prior, kind="prior")
    config.train.init_from = str(tmp_path / "prior")
    with pytest.raises(ValueError, match="holds a prior, not a complete model"):
        weights.evaluated_variables(config, tmp_path / "next", mesh)


def test_starting_variables_of_each_init_from(tmp_path, config):
    """A training workdir or a complete model gives all its variables; a prior is train.prior's, not init_from's;
    a model of other shapes is an error naming the field."""
    mesh = mesh_of(1)
    model = UniMMAD(model_config(config))
    complete = random_numpy_variables(config, seed=4)
    model_io.save(tmp_path / "model", model.config, complete)
    write_checkpoint(tmp_path / "run", config, complete, opt_state={})
    for source in ("model", "run"):
        config.train.init_from = str(tmp_path / source)
        assert_same(weights.starting_variables(model, config, mesh, tmp_path / "new"), complete)

    prior = {c: {"prior": complete[c]["prior"]} for c in complete}
    model_io.save(tmp_path / "prior", model.config, prior, kind="prior")
    config.train.init_from = str(tmp_path / "prior")
    with pytest.raises(ValueError, match=r"holds a prior, not a complete model: .*--config.train.prior=.*prior"):
        weights.starting_variables(model, config, mesh, tmp_path / "new")

    config.model.planes = tuple(2 * p for p in config.model.planes)
    config.train.init_from = str(tmp_path / "model")
    with pytest.raises(ValueError, match=r"train.init_from=.*model: .* has shape"):
        weights.starting_variables(UniMMAD(model_config(config)), config, mesh, tmp_path / "new")


def test_starting_variables_of_a_prior_file_or_folder(tmp_path, config):
    """train.prior names a WideResNet file (process 0 keeps a copy in the workdir) or a `convert prior` folder:
    the prior, copied into the general encoder; the other parts are the seed's.  Anything else is named."""
    mesh = mesh_of(1)
    model = UniMMAD(model_config(config))
    complete = random_numpy_variables(config, seed=6)
    prior = {c: {"prior": complete[c]["prior"]} for c in complete}
    model_io.save(tmp_path / "prior", model.config, prior, kind="prior")
    tensors = convert.to_reference_layout(convert.prior_key_map(model.config), prior)["prior"]
    (tmp_path / "wrn.safetensors").write_bytes(
        safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    )
    config.train.prior = str(tmp_path / "prior")
    started = weights.starting_variables(model, config, mesh, tmp_path / "new")
    seeded = init_variables(model, config.seed, slots=config.data.num_slots)
    for collection in started:
        assert_same(started[collection]["prior"], complete[collection]["prior"])
        assert_same(started[collection]["encoder"], complete[collection]["prior"])
        others = set(started[collection]) - {"prior", "encoder"}
        assert others
        assert_same({k: started[collection][k] for k in others}, {k: seeded[collection][k] for k in others})
    config.train.prior = str(tmp_path / "wrn.safetensors")
    assert_same(pretrained.prior_variables(config, tmp_path / "from_file"), prior)
    kept = tmp_path / "from_file" / pretrained.PRIOR_FOLDER / "wide_resnet50_2.safetensors"  # for every process
    assert kept.read_bytes() == (tmp_path / "wrn.safetensors").read_bytes()

    model_io.save(tmp_path / "model", model.config, complete)
    for source, message in (("model", "holds a model, not a prior"), ("nothing", "no such file or folder")):
        config.train.prior = str(tmp_path / source)
        with pytest.raises(pretrained.PriorError, match=f"train.prior=.*{source}.*{message}"):
            weights.starting_variables(model, config, mesh, tmp_path / "new")


def test_recorded_model_of_a_prior_folder_is_an_error(tmp_path, config):
    variables = random_numpy_variables(config, seed=5)
    prior = {c: {"prior": variables[c]["prior"]} for c in variables}
    model_io.save(tmp_path / "prior", model_config(config), prior, kind="prior")
    with pytest.raises(ValueError, match="holds a prior, not a complete model"):
        weights.recorded_model(tmp_path / "prior")
