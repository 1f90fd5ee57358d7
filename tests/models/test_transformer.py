import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.models.transformer import Transformer

FEATURES = [
    dict(pos="rope", norm="rmsnorm", mlp="swiglu"),
    dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    dict(pos="rope", norm="rmsnorm", mlp="relu2", n_kv_heads=2),  # GQA
    dict(pos="rope", mtp="sequential", n_future=3),
]


def build(**overrides) -> Transformer:
    cfg = dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, n_future=2)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("features", FEATURES)
def test_kv_cache_equals_full_forward(features):
    model = build(**features)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        full = model(ids, n_heads=1)[0]
        cache = model.new_cache(batch=2)
        # prefill, single tokens, then a multi-token chunk (what speculative verification sends)
        pieces = [model(ids[:, :9], cache, n_heads=1)[0]]
        pieces += [model(ids[:, t:t + 1], cache, n_heads=1)[0] for t in range(9, 14)]
        pieces.append(model(ids[:, 14:], cache, n_heads=1)[0])
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_parallel_heads_cached_in_lockstep():
    model = build(n_future=4)
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :12], cache)
        tail = model(ids[:, 12:], cache)
    for k in range(4):
        assert (tail[k] - full[k][:, 12:]).abs().max() < 1e-5


def test_heads_shapes_and_causality():
    model = build(mtp="sequential", n_future=3)
    ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        out = model(ids)
        changed = ids.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 101
        out2 = model(changed)
    assert [tuple(o.shape) for o in out] == [(2, 16, 101), (2, 15, 101), (2, 14, 101)]
    # head 0 at t <= 9 never sees token 10; depth k also reads token t+k, so t <= 9-k
    assert torch.allclose(out[0][:, :10], out2[0][:, :10])
    assert torch.allclose(out[2][:, :8], out2[2][:, :8])
    assert not torch.allclose(out[2][:, 8], out2[2][:, 8])


def test_bad_shapes_are_rejected():
    from mtplab.errors import MtplabError

    with pytest.raises(MtplabError, match="divisible"):
        ModelConfig(d_model=65, n_heads=4)
    with pytest.raises(MtplabError, match="multiple of"):
        ModelConfig(n_heads=4, n_kv_heads=3)
