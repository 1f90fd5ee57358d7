"""A padded vocabulary: the tables hold vocab_size rows, the tokenizer vocab_real of them. The padded
ids' logits are -inf in every path (after the softcap), the real ids' are unchanged, and no decoder
emits a padded id: greedy, sampling, speculative, batched, Monostep blocks, the server, both HF
exports. Losses are over the real vocabulary, label smoothing included.

The model under test has its padded rows scaled up 100x, so that without the mask they would win
every argmax (checked on an unmasked twin)."""

import copy
import dataclasses
import json
import os

import pytest
import torch

from mtplab.config import ModelConfig, TokenizerConfig
from mtplab.errors import MtplabError
from mtplab.evaluation.perplexity import perplexity
from mtplab.monostep.decoding import generate_blocks
from mtplab.inference.decode import decode_batch
from mtplab.inference.generate import generate_ids, generate_speculative
from mtplab.inference.sampling import SamplingParams, next_token_probs, sample
from mtplab.models.checkpoint import load_model, save_checkpoint
from mtplab.monostep.config import MonostepConfig
from mtplab.monostep.model import Monostep
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer
from mtplab.evaluation.head_loss import evaluate_heads
from mtplab.training.losses import backward_all_heads, backward_heads

CORPUS = ["Ava has 3 apples. Then Ava buys 5 more apples. How many apples does Ava have now?",
          "Ben had 12 pears and gave 4 away. #### 8", "The meaning of life is to live."] * 20
HOT = SamplingParams(temperature=1.0, seed=3)
REAL = 200  # the tokenizer-free tests' real vocabulary, in 256 rows


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<pad>", "<empty>"])


def table_rows(real: int) -> int:
    return 64 * (real // 64 + 1)  # a multiple of 64 with padding beyond the real ids (REAL -> 256)


def boost_padding(model, real: int) -> None:
    """Scale every unembedding's padded rows (and Monostep's biases) up 100x."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.size(0) == model.config.vocab_size and ("wte" in name or "lm_head" in name or "to_vocab" in name):
                p[real:] *= 100
                if p.dim() == 1:  # a bias: far above any real logit
                    p[real:] = 100


def padded_model(real: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = dict(vocab_size=table_rows(real), vocab_real=real, d_model=32, n_layers=2, n_heads=4,
                  max_seq_len=64, mlp="swiglu", mtp="parallel", n_future=3, init_std=0.3)
    model = Transformer(ModelConfig(**{**config, **overrides})).eval()
    boost_padding(model, real)
    return model


def unmasked(model):
    twin = copy.deepcopy(model)
    twin.config = dataclasses.replace(model.config, vocab_real=0)
    return twin


def prompts(real: int, n: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, real, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_padded_ids_are_minus_inf_and_real_logits_unchanged(softcap):
    model = padded_model(REAL, logit_softcap=softcap)
    twin = unmasked(model)
    ids = torch.randint(0, REAL, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), twin(ids)
        states = model.hidden_states(ids)
        stacked = model.stacked_logits(states)
    for k in range(3):
        assert torch.equal(ours[k][..., :REAL], theirs[k][..., :REAL])
        assert torch.all(ours[k][..., REAL:] == float("-inf"))  # not -softcap: masked after it
        assert torch.all(theirs[k].argmax(-1) >= REAL)  # unmasked, a padded id wins everywhere
        assert torch.equal(stacked[..., k, :], ours[k])


def test_every_decoding_path_emits_real_tokens_only():
    model, real = padded_model(REAL), REAL
    twin = unmasked(model)
    assert all(t >= real for t in generate_ids(twin, prompts(real)[0], 4))
    for prompt in prompts(real):
        greedy = generate_ids(model, prompt, 16)
        drafted = [t for e in generate_speculative(model, prompt, 16) for t in e.tokens]
        assert drafted == greedy and len(greedy) == 16 and max(greedy) < real
        for params in (HOT, SamplingParams(temperature=1.0, top_k=400, seed=4), SamplingParams(1.0, 0, 0.99, 5)):
            assert max(generate_ids(model, prompt, 16, params)) < real
            assert max(t for e in generate_speculative(model, prompt, 16, params) for t in e.tokens) < real
    for speculative in (False, True):
        for params in (SamplingParams(), HOT):
            done = list(decode_batch(model, prompts(real), 12, params, batch_size=3, speculative=speculative))
            assert all(c.ids and max(c.ids) < real for c in done)


def test_monostep_blocks_emit_real_tokens_only():
    torch.manual_seed(0)
    model = Monostep(MonostepConfig(vocab_size=320, vocab_real=300, d_model=32, n_layers=1,
                                    n_heads=4, max_seq_len=32, n_future=4, dropout=0.0)).eval()
    boost_padding(model, 300)
    ids = torch.tensor([prompts(300)[2]])
    with torch.no_grad():
        assert torch.all(model(ids)[..., 300:] == float("-inf"))
        assert torch.all(unmasked(model)(ids).argmax(-1) >= 300)
    for params in (SamplingParams(), HOT):
        tokens = [t for e in generate_blocks(model, ids[0].tolist(), 16, params) for t in e.tokens]
        assert tokens and max(tokens) < 300


def test_losses_are_over_the_real_vocabulary_label_smoothing_included():
    """The padded model trains and evaluates as the same weights in a table of exactly the real size."""
    model, real = padded_model(REAL, n_future=2), REAL
    cut = Transformer(dataclasses.replace(model.config, vocab_size=real, vocab_real=0))
    cut.load_state_dict({k: v[:real] if k == "wte.weight" else v for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, real, (2, 16), generator=g), torch.randint(0, real, (2, 16), generator=g)
    for step in (backward_heads, backward_all_heads):
        grads = []
        for m in (model, cut):
            m.zero_grad()
            losses = step(m, ids, labels, [1.0, 0.5], label_smoothing=0.1)
            assert all(torch.isfinite(torch.tensor(losses)))
            grads.append((losses, {n: p.grad for n, p in m.named_parameters()}))
        (padded_losses, padded_grads), (cut_losses, cut_grads) = grads
        assert padded_losses == pytest.approx(cut_losses, rel=1e-5)
        assert not padded_grads["wte.weight"][real:].any()
        for name, grad in cut_grads.items():
            assert torch.allclose(padded_grads[name][:grad.size(0)], grad, atol=1e-6), name
    with torch.no_grad():
        assert evaluate_heads(model, [(ids, labels)]) == pytest.approx(evaluate_heads(cut, [(ids, labels)]), rel=1e-5)
        stream = torch.randint(0, real, (80,), generator=g).tolist()
        nats = [perplexity(m, stream, n_bytes=200, window=32)["nats_per_token"] for m in (model, cut)]
    assert nats[0] == pytest.approx(nats[1], rel=1e-5)


def test_half_precision_logits_and_the_sampler_cope_with_minus_inf():
    model = padded_model(REAL).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([prompts(REAL)[1]]))[0][0, -1]
    assert logits.dtype == torch.bfloat16 and torch.all(logits[REAL:] == float("-inf"))
    assert torch.isfinite(logits[:REAL]).all()
    for params in (HOT, SamplingParams(temperature=1e-30), SamplingParams(temperature=0.7, top_k=300, top_p=0.9)):
        probs = next_token_probs(logits, params)
        assert torch.isfinite(probs).all() and not probs[REAL:].any()
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(next_token_probs(logits, SamplingParams(temperature=1e-30)).argmax(), logits.argmax())
    draws = sample(logits.expand(64, -1), HOT, HOT.generator(logits.device))
    assert int(draws.max()) < REAL


def test_a_checkpoint_without_the_field_takes_the_tokenizers_size(tmp_path, tokenizer):
    real = tokenizer.vocab_size
    model = padded_model(real)
    model.config = dataclasses.replace(model.config, vocab_real=0)  # as written before the field
    save_checkpoint(tmp_path, model, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["vocab_real"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path)
    assert loaded.config.vocab_real == real < loaded.config.vocab_size
    assert max(generate_ids(loaded, prompts(real)[0], 8)) < real


def test_training_records_the_tokenizers_size_and_refuses_a_smaller_real_vocabulary():
    unsized = ModelConfig()
    sized = unsized.sized_for(TokenizerConfig(vocab_size=963))
    assert (sized.vocab_size, sized.vocab_real) == (1024, 963)  # the demo's sizes
    assert (unsized.vocab_size, unsized.vocab_real) == (0, 0)  # a new config: the recipe's stays as written
    with pytest.raises(MtplabError, match="model.vocab_real is 900: it must hold the tokenizer's 963"):
        ModelConfig(vocab_real=900).sized_for(TokenizerConfig(vocab_size=963))
    with pytest.raises(MtplabError, match="tokenizer has 963 tokens but model.vocab_size is 512"):
        ModelConfig(vocab_size=512).sized_for(TokenizerConfig(vocab_size=963))
    with pytest.raises(MtplabError, match=r"model.vocab_real \(65\) must be between 0 and model.vocab_size \(64\)"):
        ModelConfig(vocab_size=64, vocab_real=65)


def test_sizing_reads_a_tokenizer_and_keeps_the_architecture(tokenizer):
    sized = ModelConfig(vocab_size=512).sized_for(tokenizer)
    assert (sized.vocab_size, sized.vocab_real) == (512, tokenizer.vocab_size)
    monostep = MonostepConfig(empty_token=1).sized_for(tokenizer)  # Monostep's tables are exact
    assert type(monostep) is MonostepConfig and monostep.empty_token == 1
    assert monostep.vocab_size == monostep.vocab_real == tokenizer.vocab_size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """The boosted model saved with the tokenizer (its real ids), and the model loaded back."""
    path = tmp_path_factory.mktemp("vocab") / "ckpt"
    save_checkpoint(path, padded_model(tokenizer.vocab_size), tokenizer)
    return path, load_model(path)[0]


def test_the_server_emits_real_tokens_only(checkpoint, tokenizer):
    from fastapi.testclient import TestClient

    from mtplab.serve import create_app

    path, model = checkpoint
    prompt = tokenizer.encode("Ava has 3 apples. Then")
    expected = generate_ids(model, prompt, 10, eos_id=tokenizer.eos_id)
    assert expected and max(expected) < tokenizer.vocab_size
    with TestClient(create_app(model, tokenizer, model_name="m")) as client:
        for speculative in (False, True):
            body = {"model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 0, "speculative": speculative}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tokenizer.decode(expected)
            assert r.json()["usage"]["completion_tokens"] == len(expected)
        body = {"model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 1, "seed": 3, "speculative": False}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        sampled = generate_ids(model, prompt, 10, HOT, eos_id=tokenizer.eos_id)
        assert r.json()["choices"][0]["text"] == tokenizer.decode(sampled) and max(sampled) < tokenizer.vocab_size


@pytest.mark.hf
@pytest.mark.parametrize("fmt", ["remote", "native"])
def test_the_hf_exports_generate_real_tokens_only(checkpoint, tokenizer, tmp_path, fmt):
    """remote: mtplab's own logits (-inf at the padded ids); native: the tables cut to the real rows."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    from mtplab.interop.hf_export import export

    path, model = checkpoint
    real = tokenizer.vocab_size
    out, written = export(path, tmp_path / "hf", fmt)
    assert written == fmt
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=fmt == "remote",
                                                           local_files_only=True).eval()
    assert hf.config.vocab_size == (real if fmt == "native" else model.config.vocab_size)
    prompt = tokenizer.encode("Ben had 12")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = hf(ids).logits
        want = model(ids)[0]
        assert (logits[..., :real] - want[..., :real]).abs().max().item() < 1e-4
        assert logits.size(-1) == real or torch.all(logits[..., real:] == float("-inf"))
        greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.manual_seed(0)
        sampled = hf.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0,
                              eos_token_id=None, pad_token_id=0)
    assert greedy[0, len(prompt):].tolist() == generate_ids(model, prompt, 10)
    assert int(sampled[0, len(prompt):].max()) < real
