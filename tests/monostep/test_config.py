"""MonostepConfig (monostep/config.py): config.json's usual model keys, `arch` = monostep first and
empty_token last, read back as a MonostepConfig; a recipe's model.arch picks it."""

from mtplab.config import ModelConfig, load_config, model_config_from_dict, model_config_to_dict
from mtplab.monostep.config import MonostepConfig
from tests.conftest import ROOT


def test_config_json_holds_the_causal_keys_then_empty_token_and_reads_back():
    config = MonostepConfig(vocab_size=50262, d_model=64, n_layers=4, n_heads=4, max_seq_len=512,
                            n_future=4, dropout=0.1, empty_token=50258)
    saved = model_config_to_dict(config)
    causal = model_config_to_dict(ModelConfig(vocab_size=64))
    assert list(saved) == [*causal, "empty_token"] and saved["arch"] == "monostep" and list(saved)[0] == "arch"
    back = model_config_from_dict(saved)
    assert type(back) is MonostepConfig and back == config


def test_a_recipe_with_arch_monostep_gives_a_monostep_config():
    recipe = load_config(ROOT / "recipes" / "monostep-gsm8k.toml").model
    assert type(recipe) is MonostepConfig and recipe.arch == "monostep"
    assert type(load_config(ROOT / "recipes" / "tiny.toml").model) is ModelConfig
