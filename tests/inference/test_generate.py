import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.inference.generate import generate_ids, generate_plain
from mtplab.inference.sampling import SamplingParams
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
    prompt = list(range(1, 61)) * 2  # 120 tokens, a 48-token window
    out = generate_ids(model, prompt, 30)
    # the last 47 tokens stay, leaving room for exactly one new token
    assert out == reference_greedy(model, prompt[-47:], 1)
    assert generate_ids(model, prompt[-40:], 30) == reference_greedy(model, prompt[-40:], 8)


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, seed=7)
    a = generate_ids(model, [1, 2], 25, params)
    assert a == generate_ids(model, [1, 2], 25, params)
    assert a != generate_ids(model, [1, 2], 25, SamplingParams(temperature=1.0, seed=8))


def test_top_k_1_sampling_is_greedy(model):
    greedy = generate_ids(model, [5, 6], 15)
    assert generate_ids(model, [5, 6], 15, SamplingParams(temperature=1.3, top_k=1, seed=1)) == greedy
