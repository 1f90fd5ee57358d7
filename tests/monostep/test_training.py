"""Seed 000's training recipe: a tiny Monostep run on generated problems (always) and on GSM8K
(when ../shared/data is present) writes config.json, metrics.json, the plot and the bundle."""

import json
import math

import pytest
import torch

import mtplab
from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.models.checkpoint import load_model, load_weights
from mtplab.monostep.bundle import SAMPLE_QUESTION, read_bundle
from mtplab.monostep.model import Monostep
from tests.monostep import model_card
from tests.conftest import ROOT, shared_path

RECIPE = ROOT / "recipes" / "monostep-gsm8k.toml"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "train.batch_size=16", "train.lr=3e-3", "train.eval_batches=0", "train.log_every=5"]
SYNTHETIC = ["tokenizer.path=", "tokenizer.vocab_size=300", "data.source=synthetic", "data.path=",
             "data.eval_path=", "data.n_train=64", "data.n_eval=8"]


def test_tiny_run_on_generated_problems_writes_the_seeds_artefacts(tmp_path):
    config = load_config(RECIPE, TINY + SYNTHETIC + ["train.epochs=3"])
    result = mtplab.train(config, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    history = json.loads((out / "metrics.json").read_text())
    assert len(history["train_loss"]) == len(history["eval_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["eval_loss"][-1] < history["eval_loss"][0]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "monostep"
    bundle = read_bundle(out / "monostep_bundle.pt")  # weights-only loadable
    assert bundle["train_history"] == history["train_loss"] and bundle["eval_history"] == history["eval_loss"]
    assert bundle["config"]["slots"] == 4 and bundle["config"]["epochs"] == 3
    assert bundle["optimizer_state_dict"]["state"]  # the optimizer as it ended
    # the bundle is the seed's format: its classes load it strictly
    c = bundle["config"]
    reference = model_card.Monostep(c["vocab_size"], c["d_model"], c["n_layers"], c["n_heads"], c["max_len"],
                                    c["slots"])
    reference.load_state_dict(bundle["model_state_dict"], strict=True)
    model, tokenizer = load_model(out)
    assert isinstance(model, Monostep) and model.config.empty_token == tokenizer.token_to_id("<empty>")
    # the bundle's sample is the trained model's greedy answer to the card's question
    assert bundle["sample_output"] == mtplab.generate(model, tokenizer, SAMPLE_QUESTION, chat=True,
                                                      max_new_tokens=128)
    assert len(result.eval_head_losses) == 4


def test_resume_after_a_stop_continues_exactly(tmp_path):
    base = TINY + SYNTHETIC
    straight = tmp_path / "straight"
    mtplab.train(load_config(RECIPE, base + ["train.epochs=2"]), straight, progress=False)
    parts = tmp_path / "parts"
    mtplab.train(load_config(RECIPE, base + ["train.epochs=1"]), parts, progress=False)
    mtplab.train(load_config(RECIPE, base + ["train.epochs=2"]), parts, resume=True, progress=False)
    a, _ = load_weights(straight)
    b, _ = load_weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "metrics.json").read_text()) == json.loads((parts / "metrics.json").read_text())


def test_bad_monostep_recipes_are_one_line_errors(tmp_path):
    with pytest.raises(MtplabError, match="train.epochs"):
        mtplab.train(load_config(RECIPE, TINY + SYNTHETIC + ["train.epochs=0"]), tmp_path / "a", progress=False)
    no_empty = TINY + SYNTHETIC + ["train.epochs=1", 'tokenizer.special_tokens=["<pad>"]']
    with pytest.raises(MtplabError, match="<empty>"):
        mtplab.train(load_config(RECIPE, no_empty), tmp_path / "b", progress=False)


def test_tiny_gsm8k_run_with_the_gpt2_tokenizer(tmp_path):
    train = shared_path("gsm8k", "train.jsonl")
    test = shared_path("gsm8k", "test.jsonl")
    shared_path("tokenizers", "gpt2")
    for name, source in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(source.read_text().splitlines(True)[:12]))
    config = load_config(RECIPE, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "train.epochs=1",
                                  f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'test.jsonl'}",
                                  "train.eval_batches=0", f"tokenizer.path={ROOT.parent / 'shared/data/tokenizers/gpt2'}"])
    mtplab.train(config, tmp_path / "run", progress=False)
    bundle = read_bundle(tmp_path / "run" / "monostep_bundle.pt")
    assert bundle["config"]["vocab_size"] == 50262
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert bundle["eval_history"] == history["eval_loss"] and len(history["eval_loss"]) == 1
    # one epoch on 12 problems leaves the model near the uniform loss over GPT-2's 50,262 ids
    assert abs(bundle["eval_history"][0] - math.log(50262)) < 0.5


def test_time_limit_ends_a_monostep_run_with_its_artefacts(tmp_path):
    config = load_config(RECIPE, TINY + SYNTHETIC + ["train.epochs=1000", "train.time_limit=1.5"])
    result = mtplab.train(config, tmp_path / "run", progress=False)
    assert result.time_limited and result.step < 1000 * 4
    bundle = read_bundle(tmp_path / "run" / "monostep_bundle.pt")
    assert len(bundle["eval_history"]) >= 1
