"""Every config file builds a valid model, loss and data section, and bad fields are named."""

import importlib.util

import pytest
from helpers import REPO, load_config

from unimmad_jax.config import loss_config, model_config
from unimmad_jax.data import BUILDERS

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name):
    config = load_config(name)
    model = model_config(config)
    loss_config(config)
    assert model.image_size == config.data.image_size == config.image_size
    assert 1 <= config.data.num_slots <= model.max_modalities
    for dataset in config.data.datasets:
        assert dataset.partition("/")[0] in BUILDERS, dataset
    assert config.train.batch_size > 0 and config.train.num_epochs > 0


SMALL_MODELS = ("continual_demo", "demo", "tiny")
"""The configs whose widths the ImageNet WideResNet-50-2 does not fit: they train from a random prior."""


@pytest.mark.parametrize("name", CONFIGS)
def test_the_paper_configs_start_from_the_imagenet_prior_and_the_small_models_from_a_random_one(name):
    config = load_config(name)
    assert config.train.prior == ("random" if name in SMALL_MODELS else "imagenet")
    assert config.train.init_from == ""


def test_image_size_is_one_field():
    config = load_config("demo")
    config.image_size = 96
    assert model_config(config).image_size == 96 and config.data.image_size == 96


def test_paper_recipe_in_unified():
    config = load_config("unified")
    assert config.image_size == 256 and config.train.batch_size == 10
    assert config.optimizer.learning_rate == 1e-3 and config.loss.moe_anneal == "reference"
    assert model_config(config).planes == (64, 128, 256) and model_config(config).blocks == (3, 4, 6)
    assert len(config.data.datasets) == 7


def test_bad_fields_are_named():
    config = load_config("tiny")
    config.model.dtype = "float32"
    config.loss.weighting = "sample"
    with pytest.raises(ValueError, match="loss.weighting='sample'"):
        loss_config(config)
    config.image_size = 100
    with pytest.raises(ValueError, match="model.image_size=100 is not a multiple of 32"):
        model_config(config)


def protocol_task_sizes(protocol: str) -> list[int]:
    """'10-5' -> [10, 5], '10-1x5' -> [10, 1, 1, 1, 1, 1], '3x5' -> [3, 3, 3, 3, 3]: 'axb' is b tasks of a."""
    sizes = []
    for part in protocol.split("-"):
        size, _, count = part.partition("x")
        sizes += [int(size)] * int(count or 1)
    return sizes


@pytest.mark.parametrize(
    "name, classes",
    [("continual_mvtec_ad", 15), ("continual_visa", 12), ("continual_mvtec3d", 10)],
)
def test_continual_protocols_split_the_classes_as_named(name, classes):
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    )
    module.__spec__.loader.exec_module(module)
    for protocol in module.PROTOCOLS:
        config = module.get_config(protocol)
        tasks = [[c for s in task for c in s.partition(":")[2].split(",")] for task in config.continual.tasks]
        assert [len(t) for t in tasks] == protocol_task_sizes(protocol), protocol
        everything = [c for t in tasks for c in t]
        assert len(set(everything)) == len(everything) == classes and everything == sorted(everything), protocol
        assert {s.partition(":")[0] for task in config.continual.tasks for s in task} == set(config.data.datasets)
    with pytest.raises(ValueError, match="unknown .* protocol '7-7'.* one of"):
        module.get_config("7-7")
