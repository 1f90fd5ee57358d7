"""`mtplab convert gpt2 | gelu-d12 | nanochat`: logits parity with the source model, the seed 001
head layout, the key report, and one-line refusals (exit 2) instead of partial loads.

GPT-2 is checked against HF transformers itself. The nanochat family is checked against a small
forward written here from the published formulas (RMSNorm without gain, split-half RoPE by -theta,
QK-norm x1.2 after RoPE, SSSL windows, gated value embeddings, resid/x0 lambdas, smear, backout,
softcap 15), independent of mtplab's layers.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtplab.cli import main
from mtplab.inference.generate import generate_ids
from mtplab.inference.generate import generate_speculative
from mtplab.models.checkpoint import load_model, read_config
from mtplab.tokenizer import Tokenizer
from tests.conftest import ROOT, shared_path

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf
transformers.logging.set_verbosity_error()

CORPUS = [f"{name} has {n} apples. Then {name} buys {m} more. How many apples does {name} have?"
          for n in range(12) for m in range(5) for name in ("Ava", "Ben", "Cleo", "Dan")]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mtplab: error:"), err
    assert pattern in lines[0], err


def report_parity(capsys, line):
    with capsys.disabled():  # shown with pytest -s: the figures the README quotes
        print(f"\n  {line}")


def train_tokenizer(directory, vocab_size, eos="<|endoftext|>"):
    tok = Tokenizer.train(CORPUS, vocab_size, eos=eos)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(directory)
    return tok


# -- GPT-2 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random 4-block GPT-2 saved by transformers (safetensors) with a tokenizer of its vocab size."""
    directory = tmp_path_factory.mktemp("gpt2") / "hf"
    tok = train_tokenizer(directory, 300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=tok.vocab_size,
                                     n_positions=128)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: move them so a mix-up shows
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(directory)
    return directory, hf


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.fixture(scope="module")
def gpt2_bin_dir(gpt2_dir, tmp_path_factory):
    """The same weights as the original hub files store them: pytorch_model.bin, bare keys, the
    attention-mask buffers, no tokenizer beside."""
    source, hf = gpt2_dir
    directory = tmp_path_factory.mktemp("gpt2bin") / "hf"
    directory.mkdir()
    shutil.copy(source / "config.json", directory / "config.json")
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(4):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_gpt2_one_head_gives_gpt2s_logits(capsys, tmp_path, gpt2_dir):
    source, hf = gpt2_dir
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "gpt2", source, "--heads", 1, "--out", out)
    assert code == 0, err
    assert "unused: none; missing: none" in text
    model, tok = load_model(out)
    assert model.config.n_layers == 3 and model.n_future == 1 and tok.vocab_size == hf.config.vocab_size
    ids = torch.randint(0, hf.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (model(ids)[0] - hf_logits(hf, ids)).abs().max().item()
    report_parity(capsys, f"gpt2 safetensors --heads 1: max |dlogits| {delta:.2e}")
    assert delta < 1e-4
    # decoding with the KV cache continues like HF's greedy search
    prompt = tok.encode("Ava has 3 apples.")
    ours = generate_ids(model, prompt, 12)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs[:len(ours)] and len(ours) == 12


def test_gpt2_converted_then_exported_generates_like_gpt2(tmp_path, gpt2_dir, monkeypatch):
    """HF GPT-2 -> mtplab -> export-hf -> AutoModelForCausalLM: greedy generate() gives GPT-2's tokens."""
    from mtplab.interop.convert import ConvertOptions, convert
    from mtplab.interop.hf_export import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, hf = gpt2_dir
    convert("gpt2", source, tmp_path / "ckpt", ConvertOptions(heads=1))
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    prompt = torch.tensor([[5, 17, 42, 9, 33]])
    with torch.no_grad():
        assert (back(prompt).logits - hf(prompt).logits).abs().max().item() < 1e-4
        ours = back.generate(prompt, max_new_tokens=12, do_sample=False)
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = ours[0, 5:].tolist()  # may stop early at the exported tokenizer's eos; GPT-2's config has none here
    assert ours and ours == theirs[0, 5:5 + len(ours)].tolist()


def test_gpt2_bin_with_buffers_and_tokenizer_elsewhere(capsys, tmp_path, gpt2_dir, gpt2_bin_dir):
    source, hf = gpt2_dir
    out = tmp_path / "ckpt"
    code, _, err = run_cli(capsys, "convert", "gpt2", gpt2_bin_dir, "--heads", 1, "--out", out)
    assert_one_line_error(code, err, "--tokenizer")  # none beside the weights
    assert not out.exists()
    code, text, err = run_cli(capsys, "convert", "gpt2", gpt2_bin_dir, "--heads", 1, "--out", out,
                              "--tokenizer", source / "tokenizer.json")
    assert code == 0, err
    assert "unused: none; missing: none; ignored: h.{i}.attn.bias x4 (attention-mask buffer), " \
           "h.{i}.attn.masked_bias x4 (attention-mask buffer)" in text
    model, _ = load_model(out)
    ids = torch.randint(0, hf.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = (model(ids)[0] - hf_logits(hf, ids)).abs().max().item()
    report_parity(capsys, f"gpt2 pytorch_model.bin --heads 1: max |dlogits| {delta:.2e}")
    assert delta < 1e-4


@pytest.mark.parametrize("args, trunk, sources", [
    (["--heads", 2], 3, [3, 3]),
    (["--heads", 3], 2, [2, 3, 3]),  # seed 001's rule: the last head repeats the last block
    (["--head-blocks", "2,3"], 2, [2, 3]),
])
def test_gpt2_heads_start_from_the_right_blocks(capsys, tmp_path, gpt2_dir, args, trunk, sources):
    source, hf = gpt2_dir
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "gpt2", source, *args, "--out", out)
    assert code == 0, err
    assert ", ".join(f"head {k} <- block {b}" for k, b in enumerate(sources)) in text
    model, _ = load_model(out)
    assert model.config.n_layers == trunk and model.n_future == len(sources)
    assert read_config(out)["run"]["converted_from"]["head_blocks"] == sources
    d = hf.config.n_embd
    blocks = hf.transformer.h
    for i in range(trunk):
        assert torch.equal(model.blocks[i].attn.k_proj.weight, blocks[i].attn.c_attn.weight.t()[d:2 * d])
    for k, b in enumerate(sources):
        head = model.heads.heads[k][0]
        assert torch.equal(head.attn.q_proj.weight, blocks[b].attn.c_attn.weight.t()[:d])
        assert torch.equal(head.mlp.down_proj.bias, blocks[b].mlp.c_proj.bias)
        assert torch.equal(head.mlp_norm.weight, blocks[b].ln_2.weight)
    # head 0 on the trunk is GPT-2 cut after block sources[0] (HF's last hidden state is normed)
    ids = torch.randint(0, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if sources[0] == hf.config.n_layer - 1:
            expected = hf_logits(hf, ids)
        else:
            hidden = hf.transformer(ids, output_hidden_states=True).hidden_states[sources[0] + 1]
            expected = hf.lm_head(hf.transformer.ln_f(hidden))
        assert (model(ids)[0] - expected).abs().max() < 1e-4


def test_speculative_decoding_of_a_converted_model_equals_greedy(capsys, tmp_path, gpt2_dir):
    source, _ = gpt2_dir
    out = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", "gpt2", source, "--heads", 3, "--out", out)[0] == 0
    model, tok = load_model(out)
    prompt = tok.encode("Ben has 4 apples. Then Ben buys")
    plain = generate_ids(model, prompt, 24)
    fast = [t for event in generate_speculative(model, prompt, 24) for t in event.tokens]
    assert fast == plain and len(plain) == 24
    code, text, err = run_cli(capsys, "generate", out, "--prompt", "Ava has", "--speculative",
                              "--max-new-tokens", 8, "--show-drafts")
    assert code == 0 and "tokens/forward" in err, err


def test_the_math_recipe_fine_tunes_a_converted_checkpoint(capsys, tmp_path, gpt2_dir):
    source, hf = gpt2_dir
    ckpt = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", "gpt2", source, "--heads", 2, "--out", ckpt)[0] == 0
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a in range(6) for b in range(6)]
    rows += [{"query": f"What is {a} times 2?", "response": f"The answer is: {2 * a}"} for a in range(20)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = [f"model.vocab_size={hf.config.vocab_size}", "model.d_model=64", "model.n_layers=3",
             "model.n_heads=4", "model.max_seq_len=128", "model.n_future=2",
             f"data.path={data}", "data.eval_path=", "data.seq_len=112", f"train.init_from={ckpt}",
             "train.steps=3", "train.batch_size=2", "train.grad_accum=2", "train.eval_every=3",
             "train.eval_batches=1", "train.warmup_steps=1", "train.device=cpu"]
    args = ["train", "--recipe", ROOT / "recipes" / "mtp-gpt2-math.toml", "--out", tmp_path / "run",
            "--quiet"] + [a for s in small for a in ("--set", s)]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    run = read_config(tmp_path / "run")["run"]["train"]
    assert run["grad_checkpointing"] and run["lr"] == 5e-5 and run["grad_accum"] == 2
    assert "trained to step 3" in text


def test_gpt2_with_the_shared_gpt2_tokenizer(capsys, tmp_path):
    tokenizer_dir = shared_path("tokenizers", "gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50257, n_positions=32)).eval()
    source = tmp_path / "gpt2-wide-vocab"
    hf.save_pretrained(source)
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "gpt2", source, "--heads", 1, "--out", out,
                              "--tokenizer", tokenizer_dir)
    assert code == 0, err
    model, tok = load_model(out)
    assert tok.encode("Hello world") == [15496, 995] and tok.vocab_size == 50257
    assert tok.eos == "<|endoftext|>" and tok.eos_id == 50256
    ids = torch.tensor([tok.encode("Hello world, this is GPT-2.")])
    with torch.no_grad():
        assert (model(ids)[0] - hf_logits(hf, ids)).abs().max() < 1e-4


# -- reports and refusals ---------------------------------------------------------------------------
def edited_copy(source, tmp_path, edit):
    directory = tmp_path / "edited"
    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_an_extra_source_key_is_reported_unused(capsys, tmp_path, gpt2_dir):
    source = edited_copy(gpt2_dir[0], tmp_path, lambda t: t.update({"transformer.h.0.attn.extra": torch.ones(3)}))
    code, text, err = run_cli(capsys, "convert", "gpt2", source, "--heads", 1, "--out", tmp_path / "o")
    assert code == 0, err
    assert "unused: transformer.h.0.attn.extra; missing: none" in text


def test_a_source_block_no_head_uses_is_reported_unused(capsys, tmp_path, gpt2_dir):
    code, text, _ = run_cli(capsys, "convert", "gpt2", gpt2_dir[0], "--head-blocks", "2,2",
                            "--out", tmp_path / "o")
    assert code == 0 and "unused: transformer.h.3.attn.c_attn.bias, transformer.h.3.attn.c_attn.weight" in text


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing required weight transformer.h.1.mlp.c_fc.bias"),
    (lambda t: t.update({"transformer.wpe.weight": torch.zeros(32, 64)}),
     "transformer.wpe.weight has shape (32, 64), expected (128, 64)"),
    (lambda t: t.update({"transformer.h.2.attn.c_attn.weight": torch.zeros(192, 64)}),  # nn.Linear's way round
     "transformer.h.2.attn.c_attn.weight has shape (192, 64), expected (64, 192)"),
])
def test_missing_or_misshaped_weights_are_refused(capsys, tmp_path, gpt2_dir, edit, message):
    source = edited_copy(gpt2_dir[0], tmp_path, edit)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "convert", "gpt2", source, "--heads", 2, "--out", out)
    assert_one_line_error(code, err, message)
    assert not out.exists() and not list(tmp_path.glob(".o.*"))  # nothing half-written


class NotAWeight:
    pass


def test_a_pickle_that_is_not_plain_weights_is_refused(capsys, tmp_path, gpt2_bin_dir):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(gpt2_bin_dir / "config.json", directory / "config.json")
    torch.save({"h.0.ln_1.weight": torch.ones(64), "trap": NotAWeight()}, directory / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "convert", "gpt2", directory, "--heads", 1, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "is not a plain weights file: torch.load(weights_only=True) refused it")
    assert "NotAWeight); mtplab does not unpickle arbitrary objects" in err


@pytest.mark.parametrize("argv, message", [
    (["convert", "gpt3", "SRC", "--out", "O"], "unknown format 'gpt3'; known: gpt2, gelu-d12, nanochat"),
    (["convert", "nanochat", "SRC", "--out", "O", "--heads", "2"],
     "--heads does not apply to nanochat (its options: --eos, --rope-base, --step, --tokenizer)"),
    (["convert", "gpt2", "SRC", "--out", "O", "--step", "3"], "--step does not apply to gpt2"),
    (["convert", "gpt2", "SRC", "--out", "O"], "gpt2: pass --heads N"),
    (["convert", "gpt2", "SRC", "--out", "O", "--heads", "9"], "--heads must be between 1 and 4"),
    (["convert", "gpt2", "SRC", "--out", "O", "--head-blocks", "0,3"], "block 0 cannot start a head"),
    (["convert", "gpt2", "SRC", "--out", "O", "--head-blocks", "2,x"], "--head-blocks expects"),
    (["convert", "gpt2", "NOPE", "--out", "O", "--heads", "1"], "no such file or directory"),
])
def test_bad_command_lines_are_one_line_errors(capsys, tmp_path, gpt2_dir, argv, message):
    argv = [str(gpt2_dir[0]) if a == "SRC" else str(tmp_path / a) if a in ("O", "NOPE") else a for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, message)


def test_converting_again_into_the_same_directory_replaces_it(capsys, tmp_path, gpt2_dir):
    out = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", "gpt2", gpt2_dir[0], "--heads", 1, "--out", out)[0] == 0
    assert run_cli(capsys, "convert", "gpt2", gpt2_dir[0], "--heads", 2, "--out", out)[0] == 0
    assert load_model(out)[0].n_future == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_an_existing_training_run_is_not_overwritten(capsys, tmp_path, gpt2_dir):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    code, _, err = run_cli(capsys, "convert", "gpt2", gpt2_dir[0], "--heads", 1, "--out", out)
    assert_one_line_error(code, err, "holds a training run")


# -- the nanochat family: a reference forward from the published formulas ------------------------
NANO = dict(n_layer=4, n_head=4, n_embd=64, sequence_len=512, window_pattern="SSSL")
SHORT = 128  # nanochat's short window at sequence_len 512: ceil(512 / 4 / 128) * 128 keys back


def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(p, ids, *, n_head, n_kv_head, rope_base, mlp, eps, window_pattern, short):
    """nanochat's GPT forward on GELU_GPT-named tensors `p` ('lm_head.weight' when untied)."""
    p = {k: v.float() for k, v in p.items()}
    b, t = ids.shape
    d = p["wte.weight"].size(1)
    hd = d // n_head
    n_layer = p["resid_lambdas"].numel()
    angles = torch.outer(torch.arange(t).float(), rope_base ** (-torch.arange(0, hd, 2).float() / hd))
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # [1, T, 1, hd/2]

    def rope(x):  # [B, T, H, hd], split halves, rotation by -theta
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)

    x = rms(p["wte.weight"][ids], eps)
    gate = p["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ p["smear_gate.weight"].t())
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0, kept = x, None
    pos = torch.arange(t)
    back = pos[:, None] - pos[None, :]  # query - key
    for i in range(n_layer):
        w = lambda name: p[f"blocks.{i}.{name}.weight"]  # noqa: E731
        x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
        h = rms(x, eps)
        q = (h @ w("attn.c_q").t()).view(b, t, n_head, hd)
        k = (h @ w("attn.c_k").t()).view(b, t, n_kv_head, hd)
        v = (h @ w("attn.c_v").t()).view(b, t, n_kv_head, hd)
        if f"value_embeds.{i}.weight" in p:
            ve = p[f"value_embeds.{i}.weight"][ids].view(b, t, n_kv_head, hd)
            g = 3 * torch.sigmoid(h[..., :12] @ w("attn.ve_gate").t())  # [B, T, Hkv]
            v = v + g[..., None] * ve
        q, k = rms(rope(q), eps) * 1.2, rms(rope(k), eps) * 1.2
        k = k.repeat_interleave(n_head // n_kv_head, dim=2)
        v = v.repeat_interleave(n_head // n_kv_head, dim=2)
        allowed = back >= 0
        if window_pattern[i % len(window_pattern)] == "S" and i < n_layer - 1:
            allowed = allowed & (back <= short)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d) @ w("attn.c_proj").t()
        u = rms(x, eps) @ w("mlp.c_fc").t()
        u = gelu_tanh(u) if mlp == "gelu" else torch.relu(u).square()
        x = x + u @ w("mlp.c_proj").t()
        if i == n_layer // 2:
            kept = x
    x = rms(x - p["backout_lambda"] * kept, eps)
    logits = x @ p.get("lm_head.weight", p["wte.weight"]).t()
    return 15 * torch.tanh(logits / 15)


def random_gelu_gpt(seed, vocab_rows=320, n_kv_head=4, untied=False, **shape):
    """A GELU_GPT state dict with every scalar away from its neutral start."""
    s = {**NANO, **shape}
    g = torch.Generator().manual_seed(seed)
    d, L, hd = s["n_embd"], s["n_layer"], s["n_embd"] // s["n_head"]
    r = lambda *size, std=1.0: torch.randn(*size, generator=g) * std  # noqa: E731
    p = {"wte.weight": r(vocab_rows, d), "resid_lambdas": 1 + 0.2 * r(L), "x0_lambdas": 0.3 * r(L),
         "smear_gate.weight": r(1, 24, std=0.5), "smear_lambda": torch.tensor([0.7]),
         "backout_lambda": torch.tensor([0.3])}
    for i in range(L):
        p[f"blocks.{i}.attn.c_q.weight"] = r(d, d, std=d ** -0.5)
        p[f"blocks.{i}.attn.c_k.weight"] = r(n_kv_head * hd, d, std=d ** -0.5)
        p[f"blocks.{i}.attn.c_v.weight"] = r(n_kv_head * hd, d, std=d ** -0.5)
        p[f"blocks.{i}.attn.c_proj.weight"] = r(d, d, std=0.5 * d ** -0.5)
        p[f"blocks.{i}.mlp.c_fc.weight"] = r(4 * d, d, std=d ** -0.5)
        p[f"blocks.{i}.mlp.c_proj.weight"] = r(d, 4 * d, std=0.5 * (4 * d) ** -0.5)
        if i % 2 == (L - 1) % 2:
            p[f"blocks.{i}.attn.ve_gate.weight"] = r(n_kv_head, 12, std=0.5)
            p[f"value_embeds.{i}.weight"] = r(vocab_rows, n_kv_head * hd, std=0.5)
    if untied:
        p["lm_head.weight"] = r(vocab_rows, d, std=d ** -0.5)
    return p


def converted_logits(out, ids, vocab_size):
    model, tok = load_model(out)
    with torch.no_grad():
        return model(ids)[0][..., :vocab_size], model, tok


@pytest.fixture(scope="module")
def nano_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return directory, train_tokenizer(directory, 300, eos="<|bos|>")


def gelu_config(vocab_size):
    return {**NANO, "vocab_size": vocab_size, "n_kv_head": 4, "tie_embeddings": True,
            "rope_base": 100000.0, "pad_vocab_size_to": 64, "mlp": "gelu"}


IDS = torch.randint(0, 100, (2, 160), generator=torch.Generator().manual_seed(4))  # > SHORT + 1


def test_gelu_d12_torch_payload_matches_the_reference(capsys, tmp_path, nano_tokenizer):
    tok_dir, tok = nano_tokenizer
    p = random_gelu_gpt(5)
    path = tmp_path / "gelu_gpt.pt"
    torch.save({"config": gelu_config(tok.vocab_size), "state_dict": p}, path)
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "gelu-d12", path, "--out", out, "--tokenizer", tok_dir)
    assert code == 0, err
    assert "unused: none; missing: none" in text and "windows SSSL (S = 129 keys)" in text
    model, loaded = assert_gelu_d12_parity(capsys, out, p, tok.vocab_size, "gelu-d12 .pt")
    assert model.config.window == SHORT + 1 and model.config.value_embeds and model.config.smear == 24
    assert loaded.eos == "<|bos|>"


def assert_gelu_d12_parity(capsys, out, weights, vocab_size, label):
    """The converted checkpoint's logits equal the reference GELU_GPT forward's; returns (model, tokenizer)."""
    ours, model, loaded = converted_logits(out, IDS, vocab_size)
    expected = reference_logits(weights, IDS, n_head=4, n_kv_head=4, rope_base=1e5, mlp="gelu", eps=1e-6,
                                window_pattern="SSSL", short=SHORT)[..., :vocab_size]
    delta = (ours - expected).abs().max().item()
    report_parity(capsys, f"{label}: max |dlogits| {delta:.2e}")
    assert delta < 1e-4
    return model, loaded


def test_gelu_d12_hf_wrapper_with_rope_buffers(capsys, tmp_path, nano_tokenizer):
    tok_dir, tok = nano_tokenizer
    p = random_gelu_gpt(6)
    directory = tmp_path / "gelu-d12-hf"
    directory.mkdir()
    config = gelu_config(tok.vocab_size)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gelu_gpt"}))
    hd = 16
    angles = torch.outer(torch.arange(10 * 512).float(), 1e5 ** (-torch.arange(0, hd, 2).float() / hd))
    tensors = {f"model.{k}": v for k, v in p.items()}
    tensors["model.rope_cos"] = angles.cos()[None, :, None]
    tensors["model.rope_sin"] = angles.sin()[None, :, None]
    save_file(tensors, directory / "model.safetensors")
    shutil.copy(tok_dir / "tokenizer.json", directory / "tokenizer.json")
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "gelu-d12", directory, "--out", out)
    assert code == 0, err
    assert "unused: none; missing: none; ignored: model.rope_cos (RoPE table, recomputed), " \
           "model.rope_sin (RoPE table, recomputed)" in text
    assert_gelu_d12_parity(capsys, out, p, tok.vocab_size, "gelu-d12 HF wrapper")
    # RoPE tables of another base are refused, not silently replaced
    code, _, err = run_cli(capsys, "convert", "gelu-d12", directory, "--out", tmp_path / "o2",
                           "--rope-base", "10000")
    assert_one_line_error(code, err, "model.rope_cos is not the RoPE table of base 10000")


def nanochat_files(directory, step, p, vocab_size):
    """nanochat's own layout: bf16 embedding, torch.compile's prefix, meta json beside."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in p.items():
        k = "transformer.wte.weight" if k == "wte.weight" else k.replace("blocks.", "transformer.h.", 1)
        state["_orig_mod." + k] = v.bfloat16() if k == "transformer.wte.weight" else v
    torch.save(state, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": {**{k: NANO[k] for k in NANO}, "vocab_size": vocab_size,
                                           "n_kv_head": 2}}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))


def nanochat_reference(p, vocab_size):
    p = {**p, "wte.weight": p["wte.weight"].bfloat16()}
    return reference_logits(p, IDS, n_head=4, n_kv_head=2, rope_base=1e5, mlp="relu2",
                            eps=torch.finfo(torch.float32).eps, window_pattern="SSSL",
                            short=SHORT)[..., :vocab_size]


def test_nanochat_checkpoint_matches_the_reference(capsys, tmp_path, nano_tokenizer):
    tok_dir, tok = nano_tokenizer
    base = tmp_path / "nanochat"
    shutil.copytree(tok_dir, base / "tokenizer")  # <base_dir>/tokenizer, as nanochat keeps it
    checkpoints = base / "base_checkpoints" / "d4"
    older, newer = (random_gelu_gpt(seed, n_kv_head=2, untied=True) for seed in (7, 8))
    nanochat_files(checkpoints, 100, older, tok.vocab_size)
    nanochat_files(checkpoints, 2000, newer, tok.vocab_size)
    out = tmp_path / "ckpt"
    code, text, err = run_cli(capsys, "convert", "nanochat", checkpoints, "--out", out)
    assert code == 0, err
    assert "step 2000" in text and "unused: none; missing: none" in text
    ours, model, _ = converted_logits(out, IDS, tok.vocab_size)
    delta = (ours - nanochat_reference(newer, tok.vocab_size)).abs().max().item()
    report_parity(capsys, f"nanochat (relu2, GQA, untied): max |dlogits| {delta:.2e}")
    assert delta < 1e-4
    assert not model.config.tie_embeddings and model.config.n_kv_heads == 2
    # KV-cache decoding of the converted model works from the command line
    code, text, err = run_cli(capsys, "generate", out, "--prompt", "Ava has", "--max-new-tokens", 6)
    assert code == 0, err
    # --step picks an older checkpoint
    code, text, err = run_cli(capsys, "convert", "nanochat", checkpoints, "--step", 100,
                              "--out", tmp_path / "older")
    assert code == 0, err
    ours, _, _ = converted_logits(tmp_path / "older", IDS, tok.vocab_size)
    assert (ours - nanochat_reference(older, tok.vocab_size)).abs().max() < 1e-4


def test_nanochat_without_a_tokenizer_names_the_option(capsys, tmp_path, nano_tokenizer):
    _, tok = nano_tokenizer
    checkpoints = tmp_path / "base_checkpoints" / "d4"
    nanochat_files(checkpoints, 5, random_gelu_gpt(9, n_kv_head=2, untied=True), tok.vocab_size)
    code, _, err = run_cli(capsys, "convert", "nanochat", checkpoints, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "pass --tokenizer PATH")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(b"not read")
    code, _, err = run_cli(capsys, "convert", "nanochat", checkpoints, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "tokenizer.pkl is a tiktoken pickle")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("_orig_mod.transformer.h.2.mlp.c_fc.weight"),
     "missing required weight transformer.h.2.mlp.c_fc.weight"),
    (lambda s: s.update({"_orig_mod.value_embeds.3.weight": torch.zeros(320, 8)}),
     "value_embeds.3.weight has shape (320, 8), expected (320, 32)"),
    (lambda s: s.update({"_orig_mod.smear_lambda": torch.zeros(2)}),
     "smear_lambda has shape (2,), expected (1,)"),
])
def test_nanochat_refuses_missing_or_misshaped_tensors(capsys, tmp_path, nano_tokenizer, edit, message):
    tok_dir, tok = nano_tokenizer
    directory = tmp_path / "d4"
    nanochat_files(directory, 1, random_gelu_gpt(10, n_kv_head=2, untied=True), tok.vocab_size)
    state = torch.load(directory / "model_000001.pt", weights_only=True)
    edit(state)
    torch.save(state, directory / "model_000001.pt")
    code, _, err = run_cli(capsys, "convert", "nanochat", directory, "--out", tmp_path / "o",
                           "--tokenizer", tok_dir)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


# -- a vocabulary that is not a multiple of 64: the padded ids are never emitted -----------------
def reference_greedy(logits_of, prompt, n):
    """Greedy decoding as GELU_GPT and nanochat do it: the whole context each step, logits cut to
    vocab_size (inside `logits_of`) before the argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits_of(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("fmt", ["gelu-d12", "nanochat"])
def test_500_tokens_in_512_rows_decode_as_the_reference(capsys, tmp_path, nano_tokenizer, fmt):
    tok_dir, tok = nano_tokenizer
    vocab = 500
    untied = fmt == "nanochat"
    p = random_gelu_gpt(11, vocab_rows=512, n_kv_head=2 if untied else 4, untied=untied)
    head = "lm_head.weight" if untied else "wte.weight"
    p[head][vocab:] *= 4  # the 12 padded rows would win most argmaxes if nothing cut them off
    if untied:
        nanochat_files(tmp_path / "d4", 1, p, vocab)
        source, kw = tmp_path / "d4", dict(n_kv_head=2, mlp="relu2", eps=torch.finfo(torch.float32).eps)
        p = {**p, "wte.weight": p["wte.weight"].bfloat16()}  # as nanochat_files stores it
    else:
        source = tmp_path / "gelu_gpt.pt"
        torch.save({"config": gelu_config(vocab), "state_dict": p}, source)
        kw = dict(n_kv_head=4, mlp="gelu", eps=1e-6)
    code, text, err = run_cli(capsys, "convert", fmt, source, "--out", tmp_path / "ckpt", "--tokenizer", tok_dir)
    assert code == 0, err
    assert "vocabulary 512 rows (500 real" in text
    model, _ = load_model(tmp_path / "ckpt")
    assert (model.config.vocab_size, model.config.vocab_real) == (512, 500)

    def full(ids):
        return reference_logits(p, ids, rope_base=1e5, window_pattern="SSSL", short=SHORT, n_head=4, **kw)

    prompts = [IDS[0, :n].tolist() for n in (3, 9, 20)] + [IDS[1, :5].tolist()]
    uncut = full(IDS).argmax(-1)
    assert (uncut >= vocab).float().mean() > 0.5  # without the cut, padded ids win
    with torch.no_grad():
        ours = model(IDS)[0]
    assert torch.all(ours[..., vocab:] == float("-inf"))
    assert (ours[..., :vocab] - full(IDS)[..., :vocab]).abs().max() < 1e-4
    for prompt in prompts:
        expected = reference_greedy(lambda ids: full(ids)[..., :vocab], prompt, 12)
        assert generate_ids(model, prompt, 12) == expected
        assert max(expected) < vocab
