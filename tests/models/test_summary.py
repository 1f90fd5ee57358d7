"""Recipes build with their seeds' published shapes; counted on the meta device (no memory)."""

import json

import pytest

import mtplab
from mtplab.cli import main
from mtplab.config import load_config
from mtplab.models.summary import build_on_meta, summarize
from tests.conftest import ROOT

RECIPES = ROOT / "recipes"


def test_aomts_100m_matches_the_card(capsys):
    config = load_config(RECIPES / "aomts-100m.toml").model
    summary = summarize(config)
    assert config.tie_embeddings  # the card: "Tied embeddings: Yes"
    assert summary["parameters"] == 118_209_024
    assert summary["per_head_module"] == {"heads.modules_.0": 8_947_712}
    # card: 8,192,000 tied embeddings + 109,261,312 "blocks" (the tied 16,000 x 512 matrix again among
    # them) + 8,947,712 MTP = 126,401,024: the unique count plus the tied matrix a second time
    b = summary["breakdown"]
    assert b == {"embeddings": 8_192_000, "trunk": 109_261_312 - 8_192_000, "heads": 8_947_712}
    assert summary["parameters"] + 16_000 * 512 == 126_401_024
    assert main(["info", str(RECIPES / "aomts-100m.toml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 118_209_024 and info["per_head_module"]["heads.modules_.0"] == 8_947_712
    assert info["card"]["parameters"] == 126_401_024
    assert "118,209,024 unique parameters + the tied 16,000 x 512" in info["card"]["explained"]
    assert "counted a second time" in info["card"]["explained"]
    assert main(["info", "aomts-100m"]) == 0  # the text summary says the same
    assert "the AOMTS-TST-s6-100M-3k-1MTP-v1 card: 126,401,024 = the 118,209,024 unique" in capsys.readouterr().out


def test_mtp_gpt2_is_gpt2_124m_plus_one_block():
    config = load_config(RECIPES / "mtp-gpt2.toml").model
    gpt2_block = 12 * 768 * 768 + 9 * 768 + 4 * 768  # attention + MLP weights and biases, two LayerNorms
    assert summarize(config)["parameters"] == 124_439_808 + gpt2_block == 131_527_680


def test_gelu_d12_matches_the_card():
    summary = summarize(load_config(RECIPES / "gelu-d12.toml").model)
    wte = 32_768 * 768
    block = 4 * 768 * 768 + 2 * 768 * 3_072  # no biases, no norm gains
    scalars = 6 * 12 * 12 + 12 + 12 + 24 + 1 + 1  # ve_gate, resid/x0 lambdas, smear gate + lambda, backout
    assert summary["parameters"] == wte + 12 * block + 6 * wte + scalars == 261_096_338
    assert summary["breakdown"] == {"embeddings": 7 * wte, "trunk": 12 * block + scalars, "heads": 0}


def test_nrm_miniaxion_is_the_cards_0_92m():
    config = load_config(RECIPES / "nrm-miniaxion.toml").model
    n_params = summarize(config)["parameters"]
    r, d, kv, f = 16, 256, 128, 512
    attention = r * (d + d) * 2 + r * (d + kv) * 2  # q, o full width; k, v to 4 kv heads
    ffn = 3 * r * (d + f)
    assert n_params == 2_048 * 256 + 6 * (attention + ffn + 2 * d) + d + 1 == 920_833
    # more thinking: more compute, the same weights
    more = load_config(RECIPES / "nrm-miniaxion.toml", ["model.n_think_loops=6"]).model
    assert summarize(more)["parameters"] == n_params
    assert summarize(more)["flops_per_token_next_token"] > summarize(config)["flops_per_token_next_token"]


def test_monostep_gsm8k_is_the_cards_16_6m_and_slots_gsm8k_its_causal_sibling():
    summary = summarize(load_config(RECIPES / "monostep-gsm8k.toml").model)
    assert summary["parameters"] == 16_567_960 and summary["family"] == "monostep"
    slot = (2 * 64 * 64 + 64) + (64 * 64 + 64) + 2 * 64 + (64 * 50_262 + 50_262)  # ff, norm, to_vocab
    assert summary["breakdown"]["heads"] == 4 * slot + 64  # + init_state
    causal = summarize(load_config(RECIPES / "slots-gsm8k.toml").model)
    assert causal["family"] == "slots" and causal["breakdown"]["trunk"] == summary["breakdown"]["trunk"]  # the same blocks, made causal


def test_meta_build_allocates_nothing():
    model = build_on_meta(load_config(RECIPES / "aomts-100m.toml").model)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("recipe", ["aomts-100m-tiny.toml", "mtp-gpt2-tiny.toml", "gelu-d12-tiny.toml",
                                    "nrm-miniaxion-tiny.toml"])
def test_tiny_variants_train_and_their_loss_falls(tmp_path, recipe):
    result = mtplab.train(RECIPES / recipe, tmp_path / "run", progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "head_losses" in r)["head_losses"][0]
    assert result.head_losses[0] < 0.85 * first
    if recipe.startswith("nrm-"):  # seed 003's thinking tokens are single special tokens
        tok = result.dataset.tokenizer
        ids = [tok.token_to_id(t) for t in ("<THINK>", "</THINK>", "<STEP>")]
        assert None not in ids and tok.encode("<THINK>") == ids[:1]


def test_info_on_a_checkpoint_counts_the_real_model(capsys, tiny_run):
    out, result = tiny_run
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"] == result.model.num_parameters()
    assert sum(summary["breakdown"].values()) == summary["parameters"]
    assert main(["info", str(RECIPES / "demo.toml"), "--json"]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert main(["info", str(RECIPES / "demo.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"parameters: {demo['parameters']:,}" in lines  # the text says what the JSON counts
    b = demo["breakdown"]
    assert f"  embeddings {b['embeddings']:,}   trunk {b['trunk']:,}   heads {b['heads']:,}" in lines
