import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.models.layers import AttentionMask
from mtplab.models.transformer import Transformer


@pytest.mark.parametrize("features", [dict(), dict(norm="layernorm", bias=True, pos="learned", mlp="gelu"),
                                      dict(mlp="swiglu", n_kv_heads=2), dict(mlp="relu2")])
def test_stacked_heads_equal_heads_run_one_by_one(features):
    config = ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, max_seq_len=32, n_future=4,
                         **features)
    model = Transformer(config).eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        h = model.trunk(ids, AttentionMask(0, 12, ids.device))
        mask = AttentionMask(0, 12, ids.device)
        one_by_one = [model.head_hidden(k, h, h, ids, mask) for k in range(4)]
        stacked = model.heads.hidden_all(4, h, None, model.rotary, mask, batched=True)
        for a, b in zip(one_by_one, stacked):
            assert (a - b).abs().max() < 1e-5
        # through the cache, in two chunks, as speculative decoding calls it
        cache = model.new_cache(batch=2)
        first = model.hidden_states(ids[:, :7], cache)
        second = model.hidden_states(ids[:, 7:], cache)
        for k in range(4):
            assert (torch.cat([first[k], second[k]], 1) - one_by_one[k]).abs().max() < 1e-5


def test_stacked_weights_follow_parameter_updates():
    model = Transformer(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                                    n_future=3)).eval()
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        before = model(ids)[2]
        model.heads.heads[2][0].mlp.down_proj.weight.add_(0.5)
        after = model(ids)[2]
        model.train()
        with torch.enable_grad():
            reference = model(ids)[2]  # the unstacked path
    assert not torch.allclose(before, after)
    assert (after - reference).abs().max() < 1e-5
