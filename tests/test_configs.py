"""Every config file builds a valid model, loss and data section, and bad fields are named."""

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
