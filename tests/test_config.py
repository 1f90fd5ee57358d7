import pytest

from mtplab.config import Config, DataConfig, ModelConfig, load_config, parse_override
from mtplab.errors import MtplabError
from mtplab.training.losses import head_weights
from tests.conftest import TINY


def test_recipe_and_overrides():
    cfg = load_config(TINY, ["train.lr=0.01", "model.mtp=sequential", "model.loss_weights=[1, 0.5]"])
    assert cfg.train.lr == 0.01 and cfg.model.mtp == "sequential"
    assert head_weights(cfg.model) == [1.0, 0.5]
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
    assert head_weights(ModelConfig(n_future=4)) == [0.25] * 4
    assert head_weights(ModelConfig(n_future=3, mtp="sequential", mtp_lambda=0.3)) == pytest.approx([1, 0.15, 0.15])
    assert head_weights(ModelConfig(n_future=2, loss_weights=[2, 1])) == [2.0, 1.0]


def test_an_unset_data_format_follows_the_source():
    assert DataConfig().format == "chat"
    assert DataConfig(source="jsonl").format == "chat"
    assert DataConfig(source="text").format == "lm"
    assert DataConfig(source="synthetic", format="lm").format == "lm"
    text = load_config(TINY, ["data.source=text", "data.path=a.txt"])
    assert text.data.format == "lm"
    assert Config.from_dict(text.to_dict()) == text  # config.json holds the derived format


def test_chat_on_plain_text_is_an_error_that_says_what_to_set():
    with pytest.raises(MtplabError, match="^data.format = chat needs question/answer data: set data.format = lm "
                                          "for data.source = text$"):
        load_config(TINY, ["data.source=text", "data.path=a.txt", "data.format=chat"])
    with pytest.raises(MtplabError, match="data.format must be chat or lm, got 'packed'"):
        DataConfig(format="packed")


def test_a_recipe_by_name_is_the_packaged_file_and_a_path_wins(tmp_path, monkeypatch):
    from mtplab.config import RECIPES, find_recipe

    assert TINY.resolve().parent == RECIPES.resolve()  # the repository's recipes/ links to the package's
    monkeypatch.chdir(tmp_path)  # no recipes/ here: only the package can answer
    assert find_recipe("tiny") == find_recipe("tiny.toml") == RECIPES / "tiny.toml"
    assert load_config("tiny") == load_config(TINY)
    (tmp_path / "tiny").write_text("[model]\nd_model = 32\n")  # a file of that name wins
    assert load_config("tiny").model.d_model == 32
    for wrong in ["tinyy", "recipes/tiny.toml", "elsewhere/gelu-d12"]:  # only bare names are looked up
        with pytest.raises(MtplabError, match=rf"recipe not found: {wrong} .*packaged recipes: .*gelu-d12, "):
            load_config(wrong)


def test_every_packaged_recipe_opens_with_what_it_is():
    from mtplab.config import packaged_recipes, recipe_summary

    recipes = packaged_recipes()
    assert {"tiny", "demo", "gelu-d12", "nrm-miniaxion-tiny", "aomts-ablation"} <= set(recipes)
    assert list(recipes) == sorted(recipes)
    for name, path in recipes.items():
        summary = recipe_summary(path)
        assert 20 <= len(summary) <= 100 and summary.endswith("."), (name, summary)
        load_config(name)  # and builds a valid config


def test_think_loops_need_a_looped_trunk():
    from mtplab.config import check_think_loops

    looped = ModelConfig(n_layers=4, loop_layers=2, n_think_loops=2)
    check_think_loops(looped, 6, "runs/x")
    with pytest.raises(MtplabError, match=r"runs/plain has no looped layers \(model.loop_layers = 0\)"):
        check_think_loops(ModelConfig(), 2, "runs/plain")
    with pytest.raises(MtplabError, match="at least 1, got 0"):
        check_think_loops(looped, 0, "runs/x")
