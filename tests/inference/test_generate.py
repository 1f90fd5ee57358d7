import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.inference.decode import TextDecoder
from mtplab.inference.generate import generate_ids, generate_plain
from mtplab.inference.sampling import SamplingParams, next_token_probs
from mtplab.models.transformer import Transformer


@pytest.fixture
def model():
    return Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=48,
                                   n_future=2)).eval()


def reference_greedy(model, prompt, n):
    """Recompute the whole sequence every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), n_heads=1)[0][0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_recomputation(model):
    for seed in range(5):
        prompt = torch.randint(0, 61, (1 + seed * 3,), generator=torch.Generator().manual_seed(seed)).tolist()
        assert generate_ids(model, prompt, 20) == reference_greedy(model, prompt, 20)


def test_stops_at_eos_and_at_the_token_limit(model):
    params = SamplingParams(temperature=1.0, seed=3)  # a varied sequence, the same both times
    free = generate_ids(model, [1, 2, 3], 10, params)
    assert len(free) == 10
    cut = next(i for i in range(1, 10) if free[i] not in free[:i])  # first new token plays eos
    events = list(generate_plain(model, [1, 2, 3], 10, params, eos_id=free[cut]))
    assert [t for e in events for t in e.tokens] == free[:cut]
    assert events[-1].finished and events[-1].tokens == []


def test_long_prompt_is_cut_to_the_window(model):
    out = generate_ids(model, list(range(1, 61)) * 2, 30)
    assert 1 <= len(out) <= 30


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, seed=7)
    a = generate_ids(model, [1, 2], 25, params)
    assert a == generate_ids(model, [1, 2], 25, params)
    assert a != generate_ids(model, [1, 2], 25, SamplingParams(temperature=1.0, seed=8))


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = next_token_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(k2, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    cold = next_token_probs(logits, SamplingParams(temperature=0.5))
    assert cold[0, 0] > 0.5 and torch.allclose(cold.sum(), torch.tensor(1.0))


def test_top_k_1_sampling_is_greedy(model):
    greedy = generate_ids(model, [5, 6], 15)
    assert generate_ids(model, [5, 6], 15, SamplingParams(temperature=1.3, top_k=1, seed=1)) == greedy


def test_streamed_text_joins_to_the_full_decode(tiny_run):
    import mtplab
    from mtplab.inference.decode import stream

    model, tok = mtplab.load(tiny_run[0])
    pieces, events = zip(*stream(model, tok, "Ava has 3 apples.", chat=True, max_new_tokens=40))
    ids = [t for e in events for t in e.tokens]
    assert "".join(pieces) == tok.decode(ids)
    decoder = TextDecoder(tok)
    emoji = tok.encode("🙂 ok")
    assert len(emoji) > 2  # a character split over byte tokens
    assert "".join(decoder.feed([i]) for i in emoji) == "🙂 ok"


def test_extreme_temperature_and_top_p_still_give_a_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-50)):
        probs = next_token_probs(logits, params)
        assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]])), params
    huge = next_token_probs(logits, SamplingParams(temperature=1e30))
    assert torch.allclose(huge, torch.full_like(huge, 0.25))


def test_text_decoder_pieces_join_to_the_full_decode_even_with_broken_utf8():
    from mtplab.inference.decode import TextDecoder
    from mtplab.tokenizer import Tokenizer

    tok = Tokenizer.train(["plain ascii text " * 20], 300)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    lead, cont = tok.token_to_id("Ã"), tok.token_to_id("©")  # the bytes 0xC3 and 0xA9: "é" when joined
    for ids in ([a, lead, cont, b], [a, lead, b, cont], [lead], [a, cont, cont], [a, lead, lead, cont]):
        decoder = TextDecoder(tok)
        pieces = [decoder.feed([t]) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids), ids
    decoder = TextDecoder(tok)
    assert decoder.feed([a, lead]) == "a" and decoder.feed([cont]) == "é"  # a split character waits
