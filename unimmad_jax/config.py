"""The configuration every config file starts from, and its validation.

Config files (`configs/*.py`) call `default_config()` and change what differs, as in the
Flax examples; `--config.<field>=<value>` overrides any field on the command line.
`config.image_size` is one reference shared by the model and the data pipeline.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from unimmad_jax.data import default_data_config
from unimmad_jax.losses import LossConfig
from unimmad_jax.models.unimmad import ModelConfig


def default_config() -> ml_collections.ConfigDict:
    """The paper's model and training recipe (docs/model.md#training-recipe) on the built-in synthetic data."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache (local or gs://; empty: off): README, "Seeing into a run".
    config.compilation_cache_dir = ""
    config.image_size = 256
    image_size = config.get_ref("image_size")

    config.model = ml_collections.ConfigDict(
        {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in ("image_size", "dtype")}
    )
    config.model.image_size = image_size
    config.model.dtype = "float32"  # "bfloat16": bf16 compute, float32 parameters and optimizer
    # model.router_condition: "cross" (the paper's routers, on the general and specific features) or
    # "specific" (the prior only: the paper's routing ablation, docs/model.md#c-moe).

    config.data = default_data_config()
    config.data.image_size = image_size

    config.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8

    config.train = ml_collections.ConfigDict()
    config.train.num_epochs = 200
    config.train.batch_size = 10  # global, over all devices and hosts
    config.train.log_every_steps = 10
    config.train.prefetch_batches = 2  # batches sent to the devices ahead of the step that reads them
    # Split the parameters and optimizer state over the devices (FSDP) instead of replicating them:
    # less memory a device, the parameters gathered in every step (README, "Training at scale").
    config.train.fsdp = False
    config.train.eval_every_epochs = 10
    config.train.checkpoint_every_epochs = 1
    # Also a checkpoint every this many steps (0: none), for epochs longer than the time a preemption may cost;
    # keep_checkpoints counts every checkpoint.
    config.train.checkpoint_every_steps = 0
    config.train.keep_checkpoints = 3
    config.train.best_metric = "All_Datasets_Mean/i_auroc"
    # (START, STOP): a jax.profiler trace of the steps from START steps done to STOP, for TensorBoard's
    # profile plugin (WORKDIR/tensorboard/plugins/profile); empty: none.
    config.train.profile_steps = ()
    # The frozen prior of a fresh run (unimmad_jax/pretrained.py): "imagenet" (the paper's, from the Hugging
    # Face Hub, cached), "random", or a path: a WideResNet-50-2 .safetensors/.pth or a `convert prior` folder.
    config.train.prior = "imagenet"
    # All the weights to start from instead, with a fresh optimizer and schedule: a training workdir (its
    # latest checkpoint) or a complete model folder (`python -m unimmad_jax.convert official`).
    config.train.init_from = ""

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 8  # global
    config.eval.split = "test"
    config.eval.datasets = ()  # empty: the training datasets
    # `--mode=eval` also evaluates with only these modalities of each sample, e.g. ("rgb", "depth", "rgb+depth").
    config.eval.modality_subsets = ()

    config.predict = ml_collections.ConfigDict()
    config.predict.input = ""  # a folder of images, or "<dataset>:<split>" of a prepared dataset
    config.predict.modality_type = "rgb"  # of the images of a folder
    config.predict.batch_size = 8
    config.predict.max_overlays = 64
    config.predict.class_name = ""  # the class of a folder's images; empty: unknown (dataset-level statistics)
    # Overrides of the calibrated decision (unimmad_jax/calibrate.py), at most one: an image-score
    # threshold for every class, or a sensitivity in (0, 1) (0.5: the calibrated thresholds).
    config.predict.threshold = ml_collections.config_dict.placeholder(float)
    config.predict.sensitivity = ml_collections.config_dict.placeholder(float)

    # Task lists of `--mode=continual` and `--mode=unified_vs_separate` (unimmad_jax/protocols.py): each
    # task a list of "dataset" or "dataset:class,class" selections; every task trains for train.num_epochs.
    config.continual = ml_collections.ConfigDict()
    config.continual.tasks = ()
    config.continual.replay_per_class = 0  # training samples of each earlier class drawn in the later tasks
    config.continual.joint = False  # also train one model on all tasks at once, for comparison

    # `--mode=sweep` (unimmad_jax/sweep.py): the config trained once per seed, the metrics' means with their
    # 95 % intervals; compare_with, the workdir of a sweep over the same seeds: the paired difference to it.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.seeds = (0, 1, 2)
    config.sweep.compare_with = ""

    config.calibrate = ml_collections.ConfigDict()
    config.calibrate.split = "validation"  # of each dataset; its train split's good images where it has none
    config.calibrate.good_quantile = 0.99  # the threshold when the calibration images are all good
    config.calibrate.min_class_images = 10  # fewer: the class takes its dataset's statistics
    return config


def protocol_config(dataset: str, num_slots: int, protocols: dict, protocol: str) -> ml_collections.ConfigDict:
    """The paper's model and recipe on `dataset`, with `protocols[protocol]` as `continual.tasks`."""
    if protocol not in protocols:
        raise ValueError(
            f"unknown {dataset} protocol {protocol!r} (after the config path's ':'); one of {list(protocols)}"
        )
    config = default_config()
    config.data.datasets = (dataset,)
    config.data.num_slots = num_slots
    config.continual.tasks = protocols[protocol]
    return config


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_mapping(config.model.to_dict())


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    known = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(config.loss) - known)
    if unknown:
        raise ValueError(f"unknown loss config field(s) {unknown}; known: {sorted(known)}")
    return LossConfig(**config.loss.to_dict())


def eval_datasets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(config.eval.datasets) or tuple(config.data.datasets)
