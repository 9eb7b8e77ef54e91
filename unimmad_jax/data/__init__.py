"""Datasets and the input pipeline.

Data flows one way: downloaded files -> a TFDS builder (`builders`) ->
array_record files in `data_dir` -> the grain pipeline (`pipeline`) -> batch
dicts of numpy arrays (docs/data.md#the-batch) -> the model. Nothing here needs TensorFlow.

Prepare a dataset once (command line: `python -m unimmad_jax.data prepare`),
then read it with `train_loader` / `eval_loader`, configured by
`config.data = default_data_config()` (fields documented in `pipeline`).
"""

from unimmad_jax.data.builders import BUILDERS, ensure_prepared, prepare
from unimmad_jax.data.pipeline import (
    DEFAULT_LOSS_WEIGHTS,
    EvalLoader,
    TrainLoader,
    default_data_config,
    eval_loader,
    first_training_images,
    train_loader,
)
from unimmad_jax.data.prepared import find_prepared, sample_counts
from unimmad_jax.data.preprocess import load_modality
from unimmad_jax.data.schema import MODALITY_TYPES, InvalidDataError

__all__ = [
    "BUILDERS",
    "DEFAULT_LOSS_WEIGHTS",
    "EvalLoader",
    "InvalidDataError",
    "MODALITY_TYPES",
    "TrainLoader",
    "default_data_config",
    "ensure_prepared",
    "eval_loader",
    "find_prepared",
    "first_training_images",
    "load_modality",
    "prepare",
    "sample_counts",
    "train_loader",
]
