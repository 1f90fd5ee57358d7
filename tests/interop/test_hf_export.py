"""`mtplab export-hf`: the exported directory loads offline in transformers (trust_remote_code, no
mtplab needed) and computes exactly what mtplab computes: every head's logits and greedy output."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from mtplab.inference.generate import generate_ids  # noqa: E402
from mtplab.interop.hf_export import absolute_imports, export_hf, remote_code  # noqa: E402
from mtplab.interop.hf_remote.modeling_mtplab import CACHE_FIELD  # noqa: E402
from mtplab.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import assert_one_line_error, run_cli, shared_path  # noqa: E402
from tests.interop.conftest import (CHECKPOINT_BASE, PROMPT, SPECIALS, greedy_hf,  # noqa: E402
                                    make_checkpoint)

NANOCHAT = dict(norm_affine=False, embed_norm=True, rope_base=1e5, qk_norm=True, qk_scale=1.2,
                window_pattern="SSSL", window=5, value_embeds=True, ve_gate_channels=12, n_layers=4,
                layer_lambdas=True, smear=8, backout=True, logit_softcap=15.0, head_layers=0,
                init_std=1.0)  # parameterless norms: a wider init to vary the greedy tokens
FAMILIES = {
    "parallel": dict(mtp="parallel", n_future=3),
    "sequential": dict(mtp="sequential", n_future=3),
    "medusa": dict(mtp="medusa", n_future=3),
    "slots": dict(mtp="slots", n_future=4),
    "gpt2-like": dict(pos="learned", norm="layernorm", bias=True, mtp="parallel", n_future=4),
    "nanochat": NANOCHAT,
    "looped": dict(n_layers=4, loop_layers=2, n_think_loops=2, n_kv_heads=2, d_ff=64, mlp="swiglu",
                   low_rank=8, head_layers=0),
}


def load_hf(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def exported(tmp_path, tokenizer, deepseek_layout=False, **overrides):
    model = make_checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", deepseek_layout=deepseek_layout)
    return model, out


def logit_delta(got, want):
    """max |got - want| over the real ids, after checking that both put -inf at the same (padded)
    ids: the checkpoint's 320 rows hold the tokenizer's 300 tokens."""
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    real = want != float("-inf")
    return (got[real] - want[real]).abs().max().item()


def check_parity(model, hf, tokenizer):
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        want = model(ids)
        got = hf(ids, output_mtp_logits=True)
    assert len(got.mtp_logits) == model.n_future
    assert logit_delta(got.logits, want[0]) < 1e-4
    assert torch.all(got.logits[..., tokenizer.vocab_size:] == float("-inf"))
    deltas = [logit_delta(g, w) for g, w in zip(got.mtp_logits, want)]
    assert all(g.shape == w.shape for g, w in zip(got.mtp_logits, want)) and max(deltas) < 1e-4, deltas
    prompt = ids[0].tolist()
    expected = generate_ids(model, prompt, 12, eos_id=tokenizer.eos_id)
    assert greedy_hf(hf, prompt, 12) == expected
    return deltas


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reloads_with_the_same_logits_and_greedy_tokens(tmp_path, tokenizer, family):
    model, out = exported(tmp_path, tokenizer, **FAMILIES[family])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mtplab" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    hf = load_hf(out)
    assert type(hf).__name__ == "MtplabForCausalLM"
    check_parity(model, hf, tokenizer)


def test_weights_keep_mtplab_names_under_model(tmp_path, tokenizer):
    model, out = exported(tmp_path, tokenizer, **FAMILIES["parallel"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["mtplab_layout"] == "mtplab"
    assert names == {f"model.{k}" for k in model.state_dict()}
    assert "model.heads.heads.2.0.attn.q_proj.weight" in names  # head 2's block, as in mtplab


def test_deepseek_layout_names_and_parity(tmp_path, tokenizer):
    model, out = exported(tmp_path, tokenizer, deepseek_layout=True, **FAMILIES["sequential"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    n = CHECKPOINT_BASE["n_layers"]
    for j in range(2):  # the MTP modules follow the trunk's n layers
        for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "input_layernorm.weight",
                     "self_attn.q_proj.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight"):
            assert f"model.layers.{n + j}.{part}" in names
    assert not any(".modules_." in name for name in names)
    assert len(names) == len(model.state_dict())
    hf = load_hf(out)
    assert set(hf.state_dict()) == names  # the wrapper registers exactly the DeepSeek-V3 names
    check_parity(model, hf, tokenizer)
    hf.save_pretrained(tmp_path / "resaved")  # transformers writes the same layout back
    again = load_hf(tmp_path / "resaved")
    assert set(again.state_dict()) == names
    check_parity(model, again, tokenizer)


def test_deepseek_layout_needs_sequential_heads(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "ckpt", tokenizer, **FAMILIES["parallel"])
    with pytest.raises(Exception, match="sequential"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", deepseek_layout=True)
    assert not (tmp_path / "hf").exists()


def test_parallel_heads_draft_through_the_cache(tmp_path, tokenizer):
    """A cache started with output_mtp_logits=True keeps every head's blocks, so each step gives
    all heads' logits for the new position, as a full forward would."""
    model, out = exported(tmp_path, tokenizer, **FAMILIES["parallel"])
    hf = load_hf(out)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        first = hf(ids[:, :-2], use_cache=True, output_mtp_logits=True)
        cache = first.past_key_values
        step = hf(ids[:, -2:], past_key_values=cache, use_cache=True, output_mtp_logits=True)
        want = model(ids)
        assert cache.get_seq_length() == ids.size(1)
        for got, full in zip(step.mtp_logits, want):
            assert logit_delta(got, full[:, -2:]) < 1e-4
        plain = hf(ids, use_cache=True)
        with pytest.raises(ValueError, match="follows head 0 only"):
            hf(ids[:, -1:], past_key_values=plain.past_key_values, output_mtp_logits=True)


def test_sequential_depths_without_a_cache_only(tmp_path, tokenizer):
    _, out = exported(tmp_path, tokenizer, **FAMILIES["sequential"])
    hf = load_hf(out)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        got = hf(ids, output_mtp_logits=True)
        assert [t.size(1) for t in got.mtp_logits] == [ids.size(1) - k for k in range(3)]
        with pytest.raises(ValueError, match="without a cache"):
            hf(ids, use_cache=True, output_mtp_logits=True)


def test_labels_and_loss(tmp_path, tokenizer):
    model, out = exported(tmp_path, tokenizer, **FAMILIES["medusa"])
    hf = load_hf(out)
    ids = torch.tensor([tokenizer.encode(PROMPT)] * 2)
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
        logits = model(ids)[0]
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert abs(loss.item() - want.item()) < 1e-5
        # right padding labelled -100: the loss of the unpadded row
        pad = tokenizer.pad_id
        padded = torch.cat([ids[:1], torch.full((1, 5), pad)], dim=1)
        mask = (torch.arange(padded.size(1)) < ids.size(1)).long()[None]
        labels = padded.masked_fill(mask == 0, -100)
        loss = hf(padded, attention_mask=mask, labels=labels).loss
        assert abs(loss.item() - want.item()) < 1e-5


# Four prompts of different lengths (3 to 19 tokens), for padded batches.
PROMPTS = ["Ben had", "The meaning of life is", "Ava has 3 apples. Then Ava buys 5 more",
           "Ava has 3 apples. Then Ava buys 5 more apples. How many apples does"]
PADDED = ["parallel", "sequential", "nanochat", "gpt2-like", "looped"]


def assert_close(got, want, *context):
    """Within 1e-5, relative to the largest logit when that is above 1: float32 batching alone
    (the same row twice, no padding) moves nanochat's logits of ~13 by 1.2e-5."""
    tol = 1e-5 * max(1.0, want[want.isfinite()].abs().max().item())
    delta = logit_delta(got, want)
    assert delta < tol, (delta, tol, *context)


def pad_batch(rows, pad_id, left=True):
    """[B, T] ids padded with pad_id on the left (or right) and the [B, T] attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row)
        mask[i, where] = 1
    return ids, mask


@pytest.mark.parametrize("family", PADDED)
def test_padded_batches_give_every_row_its_unpadded_logits(tmp_path, tokenizer, family):
    """Left and right padding (no cache, and through the cache): each row's real positions get the
    logits of that row alone, as mtplab computes them; position_ids, when given, are the positions."""
    model, out = exported(tmp_path, tokenizer, **FAMILIES[family])
    hf = load_hf(out)
    rows = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == len(rows) and tokenizer.pad_id not in sum(rows, [])
    alone = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            want = model(ids, n_heads=1)[0][0]
            assert_close(hf(ids).logits[0], want)
            alone.append(want)
        for left in (True, False):
            ids, mask = pad_batch(rows, tokenizer.pad_id, left)
            got = hf(ids, attention_mask=mask)
            for i, want in enumerate(alone):
                assert_close(got.logits[i][mask[i].bool()], want, left, i)
        # through the cache: a left-padded prefill, then two steps (mask as generate() passes it,
        # then none: the cache remembers its padding)
        ids, mask = pad_batch([r[:-2] for r in rows], tokenizer.pad_id)
        first = hf(ids, attention_mask=mask, use_cache=True)
        cache = getattr(first, CACHE_FIELD)
        nxt = torch.tensor([[r[-2]] for r in rows])
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
        step = hf(nxt, attention_mask=mask, cache=cache, use_cache=True)
        last = hf(torch.tensor([[r[-1]] for r in rows]), cache=cache, use_cache=True)
        assert cache.get_seq_length() == ids.size(1) + 2
        for i, want in enumerate(alone):
            assert_close(step.logits[i, -1], want[-2], i)
            assert_close(last.logits[i, -1], want[-1], i)
        if family == "sequential":  # depths need unpadded rows
            ids, mask = pad_batch(rows, tokenizer.pad_id)
            with pytest.raises(ValueError, match="sequential MTP depths take no padding"):
                hf(ids, attention_mask=mask, output_mtp_logits=True)
        elif family == "parallel":  # every head's logits, padded
            ids, mask = pad_batch(rows, tokenizer.pad_id)
            got = hf(ids, attention_mask=mask, output_mtp_logits=True).mtp_logits
            for i, row in enumerate(rows):
                want = model(torch.tensor([row]))
                for k in range(model.n_future):
                    assert_close(got[k][i][mask[i].bool()], want[k][0], i, k)


@pytest.mark.parametrize("family", ["gpt2-like", "nanochat"])
def test_position_ids_are_the_positions(tmp_path, tokenizer, family):
    """position_ids are used, not dropped: row 1's, with a gap of 7 halfway (RoPE only sees
    relative positions), give mtplab's logits at those positions."""
    model, out = exported(tmp_path, tokenizer, **FAMILIES[family])
    hf = load_hf(out)
    ids = torch.tensor([tokenizer.encode(PROMPT)] * 2)
    t = ids.size(1)
    plain = torch.arange(t)[None]
    shifted = torch.stack([torch.arange(t), torch.arange(t) + 7 * (torch.arange(t) >= t // 2)])
    with torch.no_grad():
        base = hf(ids).logits
        assert torch.equal(hf(ids, position_ids=plain).logits, base)  # the plain ones: the plain path
        got = hf(ids, position_ids=shifted).logits
        want = model(ids, n_heads=1, positions=shifted)[0]
        assert_close(got, want)
        assert_close(got[0], base[0])
        assert logit_delta(got[1], base[1]) > 1e-3  # row 1's positions differ
        with pytest.raises(ValueError, match="position_ids must be"):
            hf(ids, position_ids=torch.arange(t + 1)[None])
        with pytest.raises(ValueError, match="attention_mask must be"):
            hf(ids, attention_mask=torch.ones(2, t + 1, dtype=torch.long))


@pytest.mark.parametrize("family", PADDED)
def test_left_padded_generate_gives_every_row_its_batch_1_tokens(tmp_path, tokenizer, family):
    """generate() on four left-padded prompts of different lengths (the HF tokenizer pads): each
    row's greedy tokens are its batch-1 tokens, which are mtplab's."""
    model, out = exported(tmp_path, tokenizer, **FAMILIES[family])
    hf = load_hf(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf_tok.padding_side = "left"
    batch = hf_tok(PROMPTS, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())
    n = 10
    eos = tokenizer.eos_id
    with torch.no_grad():
        out_ids = hf.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    width = batch["input_ids"].size(1)
    produced = []
    for i, text in enumerate(PROMPTS):
        prompt = tokenizer.encode(text)
        tokens = out_ids[i, width:].tolist()
        tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
        assert tokens == greedy_hf(hf, prompt, n) == generate_ids(model, prompt, n, eos_id=eos), i
        produced.append(tokens)
    assert sum(map(len, produced)) >= n  # real continuations, not an immediate end of text


def test_tokenizer_and_chat_template(tmp_path, tokenizer):
    _, out = exported(tmp_path, tokenizer, **FAMILIES["parallel"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<pad>"
    assert hf_tok.eos_token_id == tokenizer.eos_id and hf_tok.pad_token_id == tokenizer.pad_id
    text = "<user> Ava has 3 apples.<|endoftext|>"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    ids = tokenizer.encode(text)
    assert hf_tok.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    for messages in ([{"role": "user", "content": " How many apples? "}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]):
        for prompt in (True, False):
            rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert rendered == tokenizer.render_chat(messages, add_generation_prompt=prompt)


def test_gpt2_tokenizer_export(tmp_path):
    gpt2 = Tokenizer.from_path(shared_path("tokenizers", "gpt2"), SPECIALS)
    make_checkpoint(tmp_path / "ckpt", gpt2, vocab_size=50304, d_model=16, n_layers=1, n_heads=2)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    assert hf_tok("Hello world")["input_ids"] == [15496, 995]
    assert hf_tok.eos_token_id == 50256 and hf_tok.convert_tokens_to_ids("<assistant>") == 50261


def test_remote_code_imports_only_torch_transformers_and_the_standard_library():
    files = remote_code()
    assert {"configuration_mtplab.py", "modeling_mtplab.py", "mtplab_transformer.py", "mtplab_heads.py",
            "mtplab_layers.py", "mtplab_kv_cache.py", "mtplab_config.py", "mtplab_errors.py"} <= set(files)
    for name, source in files.items():
        assert absolute_imports(source) <= {"torch", "transformers"} | set(sys.stdlib_module_names), name
        for target in re.findall(r"^\s*from\s+\.(\S+)\s+import", source, flags=re.MULTILINE):
            assert f"{target}.py" in files, (name, target)  # transformers copies these siblings
    # what transformers' import check counts: try blocks are optional, relative imports are files
    assert absolute_imports("import numpy.linalg\nfrom .x import y\ntry:\n    import tomli\n"
                            "except ImportError:\n    pass\n") == {"numpy"}


def test_loads_without_mtplab_importable(tmp_path, tokenizer):
    """A fresh interpreter in which `import mtplab` fails loads and runs the export."""
    model, out = exported(tmp_path, tokenizer, **FAMILIES["nanochat"])
    ids = tokenizer.encode(PROMPT)
    script = (
        "import sys, json, torch\n"
        "sys.modules['mtplab'] = None  # any import of mtplab now raises ImportError\n"
        "from transformers import AutoModelForCausalLM\n"
        f"hf = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, local_files_only=True)\n"
        f"print(json.dumps(hf.generate(torch.tensor([{ids}]), max_new_tokens=8, do_sample=False)[0].tolist()))\n"
        "assert not any(name.split('.')[0] == 'mtplab' for name in sys.modules if sys.modules[name])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens = json.loads(result.stdout.strip().splitlines()[-1])[len(ids):]
    assert tokens == generate_ids(model, ids, 8, eos_id=tokenizer.eos_id)[:len(tokens)]
    assert len(tokens) == 8 or tokens[-1] == tokenizer.eos_id


def test_cli_exports_and_refuses_bad_input(capsys, tmp_path, tokenizer):
    make_checkpoint(tmp_path / "ckpt", tokenizer, **FAMILIES["parallel"])
    out = tmp_path / "hf"
    code, text, _ = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(out))
    assert code == 0 and "trust_remote_code=True" in text
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "modeling_mtplab.py"} <= {p.name for p in out.iterdir()}

    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "no checkpoint directory")
    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"),
                           "--deepseek-layout")
    assert_one_line_error(code, err, "sequential MTP heads")
    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(out))
    assert_one_line_error(code, err, "not empty")
    code, _, err = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ckpt"),
                           "--force")
    assert_one_line_error(code, err, "holds the checkpoint")

    (out / "stale.txt").write_text("from an older export")
    code, _, _ = run_cli(capsys, "export-hf", str(tmp_path / "ckpt"), "--out", str(out), "--force")
    assert code == 0 and not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary left behind
