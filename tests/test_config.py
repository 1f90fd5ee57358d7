import pytest

from mtplab.config import ModelConfig, load_config, parse_override
from mtplab.errors import MtplabError
from tests.conftest import TINY


def test_recipe_and_overrides():
    cfg = load_config(TINY, ["train.lr=0.01", "model.mtp=sequential", "model.loss_weights=[1, 0.5]"])
    assert cfg.train.lr == 0.01 and cfg.model.mtp == "sequential"
    assert cfg.model.head_weights == [1.0, 0.5]
    assert cfg.model.n_future == 2  # from the recipe


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(MtplabError, match=r"unknown key 'lr_max'.*valid keys: steps, epochs, batch_size"):
        load_config(TINY, ["train.lr_max=1"])
    with pytest.raises(MtplabError, match="unknown key 'optim'"):
        load_config(TINY, ["optim.lr=1"])


def test_wrong_types_and_values_are_errors():
    with pytest.raises(MtplabError, match="must be an integer"):
        load_config(TINY, ["model.d_model=1.5"])
    with pytest.raises(MtplabError, match="model.mtp must be one of"):
        load_config(TINY, ["model.mtp=medusa2"])
    with pytest.raises(MtplabError, match="section.key=value"):
        parse_override("lr=3")


def test_head_weights():
    assert ModelConfig(n_future=4).head_weights == [0.25] * 4
    assert ModelConfig(n_future=3, mtp="sequential", mtp_lambda=0.3).head_weights == pytest.approx([1, 0.15, 0.15])
