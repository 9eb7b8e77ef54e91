"""Where a run's variables (`params` and `batch_stats`) come from: every source of weights, in one place.

Training starts from (`starting_variables`; step 0, a fresh optimizer, `loop.initial_state`):
  1. `train.init_from` names a training workdir: its latest checkpoint's variables (training goes
     on from another run, on new data);
  2. `train.init_from` names a complete model (`convert official`, `model_io`): all of it;
  3. no `train.init_from`, `train.prior` names pretrained weights (`imagenet`, a file or a `convert
     prior` folder; `pretrained.prior_variables`): the prior, copied into the general encoder; the
     other parts random from `seed`;
  4. no `train.init_from`, `train.prior=random`: random from `seed`, the prior's BatchNorm statistics
     measured on the first training batch (`random_variables`).
Cases 1 and 2 are `train.init_from`'s sources, read by `init_from_variables`: a new kind of
source is one more case there.  Only case 3 may reach the network, and only a fresh run starts.

Evaluation, calibration, prediction, `jax.export` and `convert to-reference` use
(`evaluated_checkpoint`): the newest readable checkpoint in the workdir, else `train.init_from`
(cases 1 and 2).

A checkpoint's variables are read without its optimizer state (`checkpoints.newest_variables`)
and placed on the caller's mesh, whatever mesh wrote them.  Folders may be local or `gs://...`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from unimmad_jax import checkpoints, model_io, pretrained, sharding
from unimmad_jax.config import model_config
from unimmad_jax.data import first_training_images
from unimmad_jax.models.layers import BATCH_NORM_MOMENTUM
from unimmad_jax.models.unimmad import ModelConfig, UniMMAD, abstract_variables, init_variables


def starting_variables(model: UniMMAD, config: ml_collections.ConfigDict, mesh: Mesh, workdir: epath.PathLike) -> dict:
    """The variables a new run in `workdir` trains from (the cases of the module docstring): a function of the
    config alone, the same whatever the number of processes and devices (the first global batch is read whole by
    every process; a pretrained prior's file is fetched by process 0 and read by every process from `workdir`)."""
    main = sharding.is_main_process()
    if config.train.init_from:
        if main:
            print(f"Starting from the weights of {config.train.init_from} (train.init_from), its prior included")
        return init_from_variables(config, mesh)
    prior = pretrained.prior_variables(config, workdir)
    if prior is None:
        if main:
            print(
                f"The prior: random weights (train.prior={pretrained.RANDOM}), its BatchNorm statistics measured on "
                "a training batch: its features are not ImageNet features"
            )
        images = first_training_images(config.data, seed=config.seed, batch_size=config.train.batch_size)
        return random_variables(model, config, images)
    variables = init_variables(model, config.seed, slots=config.data.num_slots)
    return with_encoder_from_prior({c: {**variables[c], "prior": prior[c]["prior"]} for c in variables})


def evaluated_variables(config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh: Mesh) -> dict:
    """`evaluated_checkpoint`'s variables."""
    return evaluated_checkpoint(config, workdir, mesh)[1]


def evaluated_checkpoint(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, mesh: Mesh
) -> tuple[int | None, dict]:
    """(checkpoint step, variables) to evaluate, calibrate, predict or export with, replicated on `mesh`: the newest
    readable checkpoint in `workdir` (damaged ones after it named in a warning), else (None, `train.init_from`: a
    training workdir or a `convert official` folder)."""
    newest = newest_checkpoint_variables(config, workdir, mesh)
    if newest is not None:
        return newest[0], newest[2]
    if config.train.init_from:
        return None, jax.device_put(init_from_variables(config, mesh), sharding.replicated(mesh))
    raise FileNotFoundError(
        f"no checkpoint in {checkpoints.workdir_path(workdir) / 'checkpoints'} and no complete model or training "
        "workdir in train.init_from: train first, or convert a released model with `python -m unimmad_jax.convert`"
    )


def init_from_variables(config: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """All variables of `train.init_from`: a training workdir's latest checkpoint, on `mesh`, or a complete model."""
    source = config.train.init_from
    where = f"train.init_from={source}"
    # 1. A training workdir: its latest checkpoint, on `mesh`.
    if checkpoints.is_training_workdir(source):
        newest = newest_checkpoint_variables(config, source, mesh)
        if newest is None:
            raise FileNotFoundError(f"{where}: no complete checkpoint in {epath.Path(source) / 'checkpoints'}")
        return newest[2]
    # 2. A folder of `python -m unimmad_jax.convert official`.
    kind, _, variables = model_io.load(source)
    if kind != "model":
        raise ValueError(
            f"{where} holds a {kind}, not a complete model: start from a prior with --config.train.prior={source}"
        )
    model_io.check_compatible(variables, abstract_variables(model_config(config), slots=config.data.num_slots), where)
    return variables


def newest_checkpoint_variables(
    config: ml_collections.ConfigDict | None, workdir: epath.PathLike, mesh: Mesh
) -> tuple[int, dict, dict] | None:
    """(step, JSON record, variables) of the newest readable checkpoint in `workdir`, replicated on `mesh`, its
    optimizer state unread; None without checkpoints.  `config` None: the config recorded with the checkpoint."""

    def target(record: dict) -> dict:
        model_cfg = config if config is not None else ml_collections.ConfigDict(record["config"])
        abstract = abstract_variables(model_config(model_cfg), slots=model_cfg.data.num_slots)
        return sharding.placed(abstract, sharding.state_sharding(abstract, mesh, fsdp=False))

    return checkpoints.newest_variables(workdir, target)


def random_variables(model: UniMMAD, config: ml_collections.ConfigDict, prior_images: np.ndarray) -> dict:
    """Random variables from `seed`, the prior's BatchNorm statistics measured on `prior_images [n, H, W, 3]`."""
    variables = init_variables(model, config.seed, slots=config.data.num_slots)
    variables["batch_stats"]["prior"] = prior_statistics(model, variables, prior_images)
    return with_encoder_from_prior(variables)


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


def with_encoder_from_prior(variables: dict) -> dict:
    """`variables` with the general encoder a copy of the prior, as training starts it
    (docs/model.md#prior-and-general-encoder)."""
    return {c: {**variables[c], "encoder": jax.tree_util.tree_map(jnp.copy, variables[c]["prior"])} for c in variables}


def recorded_model(path: epath.PathLike) -> tuple[ModelConfig, dict]:
    """(model config, numpy variables) of a folder that records its own config: a training workdir (its latest
    checkpoint and the config recorded with it) or a complete model folder (`convert official`)."""
    latest = recorded_checkpoint(path)
    if latest is not None:
        _, record, variables = latest
        return model_config(ml_collections.ConfigDict(record["config"])), variables
    if checkpoints.is_training_workdir(path):
        raise FileNotFoundError(f"{checkpoints.workdir_path(path) / 'checkpoints'}: no complete checkpoint")
    return complete_model(path)


def recorded_checkpoint(workdir: epath.PathLike) -> tuple[int, dict, dict] | None:
    """(step, JSON record, numpy variables) of the newest readable checkpoint in `workdir`, its variables read for
    the config recorded with it; None without a checkpoint."""
    mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    newest = newest_checkpoint_variables(None, workdir, mesh)
    if newest is None:
        return None
    step, record, variables = newest
    return step, record, jax.tree_util.tree_map(np.asarray, variables)


def complete_model(path: epath.PathLike) -> tuple[ModelConfig, dict]:
    """(model config, numpy variables) of a complete model folder (`convert official`); a prior is an error."""
    kind, cfg, variables = model_io.load(path)
    if kind != "model":
        raise ValueError(f"{path} holds a {kind}, not a complete model")
    return cfg, variables
