"""`mtplab export-hf --format native` and `mtplab convert hf`: a GPT-2- or Llama-shaped trunk loads as
GPT2LMHeadModel / LlamaForCausalLM with trust_remote_code=False and computes what mtplab computes
(logits, greedy tokens, left-padded batches); the heads beside it come back bit for bit."""

import json
import os

import pytest
import torch
from safetensors import safe_open

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from mtplab.errors import MtplabError  # noqa: E402
from mtplab.inference.generate import generate_ids  # noqa: E402
from mtplab.models.checkpoint import load_model, read_config  # noqa: E402
from mtplab.interop.convert import convert  # noqa: E402
from mtplab.interop.hf_export import export  # noqa: E402
from mtplab.interop.hf_native import misfit_message  # noqa: E402
from mtplab.config import ModelConfig  # noqa: E402
from tests.conftest import assert_one_line_error, run_cli  # noqa: E402
from tests.interop.conftest import PROMPT, greedy_hf, make_checkpoint  # noqa: E402

# aomts-100m-tiny's flags in miniature: RoPE, RMSNorm, SwiGLU, no biases, here with GQA
LLAMA = dict(mlp="swiglu", norm="rmsnorm", pos="rope", n_kv_heads=2, d_ff=48, rope_base=5000.0,
             norm_eps=1e-6, mtp="sequential", n_future=2, mtp_lambda=0.1)
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, mtp="parallel", n_future=1)
TRUNKS = {"llama-untied": ({**LLAMA, "tie_embeddings": False}, "LlamaForCausalLM"),
          "llama-tied": ({**LLAMA, "tie_embeddings": True}, "LlamaForCausalLM"),
          "gpt2": (GPT2, "GPT2LMHeadModel")}
FAMILIES = {  # every head family that can sit beside a standard model, and trunk variants it maps
    "parallel": {**LLAMA, "mtp": "parallel", "n_future": 3, "head_layers": 2},
    "sequential": {**LLAMA, "n_future": 3, "tie_embeddings": False},
    "medusa": {**GPT2, "mtp": "medusa", "n_future": 3},
    "gpt2-parallel-no-bias-no-gain": {**GPT2, "n_future": 2, "bias": False, "norm_affine": False},
    "llama-bias": {**LLAMA, "bias": True, "mtp": "medusa", "n_future": 2},
}
PROMPTS = ["Ava has 3 apples. Then", "Ben had 12", "The meaning of life is", "How many apples does Ava"]


def load_native(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=False, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def exported(tmp_path, tokenizer, fmt="native", **overrides):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    out, written = export(tmp_path / "ckpt", tmp_path / "hf", fmt)
    return model, out, written


def real(logits, tokenizer):
    """mtplab's logits at the tokenizer's ids, after checking that the padded ids' are -inf: the
    native export holds the real rows only."""
    assert torch.all(logits[..., tokenizer.vocab_size:] == float("-inf"))
    return logits[..., :tokenizer.vocab_size]


def assert_same_model(a, b):
    """Bit for bit, but for the padded vocabulary rows, which come back as zeros."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    n = a.config.real_vocab_size
    for k in sa:
        if k in ("wte.weight", "lm_head.weight"):
            assert not sb[k][n:].any()
            sa, sb = {**sa, k: sa[k][:n]}, {**sb, k: sb[k][:n]}
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("trunk", TRUNKS)
def test_native_export_loads_without_remote_code_and_matches(tmp_path, tokenizer, trunk):
    overrides, arch = TRUNKS[trunk]
    model, out, written = exported(tmp_path, tokenizer, **overrides)
    assert written == "native"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch] and "auto_map" not in config
    assert not list(out.glob("*.py"))
    hf = load_native(out)
    assert type(hf).__name__ == arch
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert (hf(ids).logits - real(model(ids)[0], tokenizer)).abs().max().item() < 1e-5
    assert config["vocab_size"] == tokenizer.vocab_size < model.config.vocab_size
    prompt = ids[0].tolist()
    assert greedy_hf(hf, prompt, 12) == generate_ids(model, prompt, 12, eos_id=tokenizer.eos_id)


@pytest.mark.parametrize("trunk", TRUNKS)
def test_left_padded_batch_gives_each_row_its_own_result(tmp_path, tokenizer, trunk):
    model, out, _ = exported(tmp_path, tokenizer, **TRUNKS[trunk][0])
    hf = load_native(out)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    width, pad = max(map(len, prompts)), tokenizer.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        for row, p in enumerate(prompts):
            want = real(model(torch.tensor([p]))[0][0], tokenizer)
            assert (logits[row, width - len(p):] - want).abs().max().item() < 1e-5
        out_ids = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=pad)
    for row, p in enumerate(prompts):
        tokens = out_ids[row, width:].tolist()
        tokens = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
        assert tokens == generate_ids(model, p, 10, eos_id=tokenizer.eos_id), row


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_hf_gives_back_the_checkpoint_bit_for_bit(tmp_path, tokenizer, family):
    model, out, _ = exported(tmp_path, tokenizer, **FAMILIES[family])
    heads = json.loads((out / "mtp_heads.json").read_text())
    assert heads["model"]["mtp"] == model.config.mtp and heads["mtplab_version"]
    with safe_open(str(out / "mtp_heads.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names and all(name.startswith("heads.") for name in names)
    assert not any(name.startswith("heads.heads.0.") for name in names)  # head 0 is standard layers
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}  # vLLM loads only that file
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():  # the standard model alone is head 0 of the mtplab model
        assert (load_native(out)(ids).logits - real(model(ids)[0], tokenizer)).abs().max().item() < 1e-5
    convert("hf", out, tmp_path / "back")
    back, back_tokenizer = load_model(tmp_path / "back")
    assert_same_model(model, back)
    assert back_tokenizer.describe() == tokenizer.describe()
    assert back_tokenizer.encode(PROMPT) == tokenizer.encode(PROMPT)
    assert read_config(tmp_path / "back")["run"]["converted_from"]["format"] == "hf"


def test_the_native_layers_are_the_trunk_then_head_0(tmp_path, tokenizer):
    model, out, _ = exported(tmp_path, tokenizer, **FAMILIES["parallel"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 + 2 and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 5000.0 and config["rms_norm_eps"] == 1e-6
    hf = load_native(out)
    state = model.state_dict()
    assert torch.equal(hf.model.layers[1].mlp.gate_proj.weight, state["blocks.1.mlp.gate_proj.weight"])
    assert torch.equal(hf.model.layers[3].self_attn.k_proj.weight, state["heads.heads.0.1.attn.k_proj.weight"])
    assert json.loads((out / "mtp_heads.json").read_text())["native_layers"][2] == "heads.heads.0.0."


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_convert_hf_reads_a_plain_transformers_directory(tmp_path, tokenizer, kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=320, n_positions=48, n_embd=32, n_layer=3, n_head=4,
                                         initializer_range=0.3)
        hf = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=48, initializer_range=0.3)
        hf = transformers.LlamaForCausalLM(config)
    hf.eval().save_pretrained(tmp_path / "hf")
    tokenizer.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    converted = convert("hf", tmp_path / "hf", tmp_path / "ckpt")
    assert not converted.report.unused
    model, _ = load_model(tmp_path / "ckpt")
    assert model.config.n_future == 1 and model.config.n_layers == 2  # the last layer is head 0
    # 320 rows, 300 tokens: the rows beyond the tokenizer's ids are padding, never emitted
    assert model.config.vocab_real == tokenizer.vocab_size == 300
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert (hf(ids).logits[..., :300] - real(model(ids)[0], tokenizer)).abs().max().item() < 1e-5
    export(tmp_path / "ckpt", tmp_path / "again", "native")  # and out again: the same real rows
    again = load_native(tmp_path / "again")
    assert all(torch.equal(a[:300] if a.size(0) == 320 else a, b)
               for a, b in zip(hf.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("overrides, feature", [
    (dict(value_embeds=True), "value embeddings (model.value_embeds) have no place in LlamaForCausalLM"),
    (dict(mtp="slots", n_future=3, mlp="swiglu"), "slot heads' next-token slot (heads.slots.0"),
    (dict(mlp="gelu"), "the gelu MLP (model.mlp='gelu'; Llama's is SwiGLU)"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", n_kv_heads=2), "grouped-query attention (model.n_kv_heads=2) "
                                                          "has no place in GPT2LMHeadModel"),
    (dict(qk_norm=True, logit_softcap=15.0), "QK-norm (model.qk_norm) has no place in LlamaForCausalLM "
                                             "(nor model.logit_softcap=15)"),
])
def test_cli_native_refuses_a_trunk_that_does_not_fit_and_auto_goes_remote(capsys, tmp_path, tokenizer,
                                                                            overrides, feature):
    make_checkpoint(tmp_path / "ckpt", tokenizer, **{**LLAMA, **overrides})
    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                           "--format", "native")
    assert_one_line_error(code, err, "cannot export natively: " + feature)
    assert not (tmp_path / "hf").exists()
    code, text, _ = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert code == 0 and "remote code" in text and "trust_remote_code=True" in text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mtplab"


def test_cli_auto_exports_natively_and_convert_hf_reads_it_back(capsys, tmp_path, tokenizer):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer, **FAMILIES["sequential"])
    code, text, _ = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert code == 0 and "(native)" in text and "trust_remote_code=False" in text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    code, _, _ = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "remote"),
                         "--format", "remote")
    assert code == 0 and (tmp_path / "remote" / "modeling_mtplab.py").is_file()
    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"),
                           "--format", "native", "--deepseek-layout")
    assert_one_line_error(code, err, "remote-code export")
    code, text, _ = run_cli(capsys, "convert", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert code == 0 and "3 sequential heads" in text
    assert_same_model(model, load_model(tmp_path / "back")[0])
    code, _, err = run_cli(capsys, "convert", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "y"),
                           "--heads", "2")
    assert_one_line_error(code, err, "--heads does not apply to hf")
    code, _, err = run_cli(capsys, "convert", "hf", str(tmp_path / "remote"), "--out", str(tmp_path / "y"))
    assert_one_line_error(code, err, "model_type 'mtplab'")


def test_convert_hf_refuses_what_would_not_come_back(tmp_path, tokenizer):
    _, out, _ = exported(tmp_path, tokenizer, **FAMILIES["gpt2-parallel-no-bias-no-gain"])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layer": 5}))
    with pytest.raises(MtplabError, match="n_layer is 5, the mtplab model has 3"):
        convert("hf", out, tmp_path / "a")
    (out / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    weights = load_file(str(out / "model.safetensors"))
    weights["transformer.h.0.ln_1.weight"] += 0.5  # a gain the parameterless mtplab norm cannot hold
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MtplabError, match="blocks.0.attn_norm.weight is not 1 everywhere"):
        convert("hf", out, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_misfit_message_is_none_exactly_for_standard_trunks():
    assert misfit_message(ModelConfig(vocab_size=64, **LLAMA)) is None
    assert misfit_message(ModelConfig(vocab_size=64, **GPT2)) is None
    assert misfit_message(ModelConfig(vocab_size=64, **LLAMA, window_pattern="SL", window=1000)) is None
    assert "sliding-window" in misfit_message(ModelConfig(vocab_size=64, **LLAMA, window_pattern="SL", window=4))
    assert "looped layers" in misfit_message(ModelConfig(vocab_size=64, **LLAMA, loop_layers=1))
    assert "low-rank" in misfit_message(ModelConfig(vocab_size=64, **LLAMA, low_rank=4))
    assert "rmsnorm" in misfit_message(ModelConfig(vocab_size=64, **{**GPT2, "norm": "rmsnorm"}))
