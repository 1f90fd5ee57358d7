"""nanochat (seed 004) and looped (seed 003) trunk features: incremental decoding with the KV cache
equals the full forward, windows hide what is out of reach, think loops cost compute, not weights."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.errors import MtplabError
from tests.conftest import FEATURE_BASE, FEATURES, LOOPED, NANOCHAT, feature_model


def incremental(model, ids, chunks):
    cache = model.new_cache(ids.size(0), ids.size(1))
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(ids[:, pos:pos + n], cache, n_heads=1)[0])
        pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", FEATURES)
def test_kv_cache_decoding_equals_the_full_forward(name):
    model = feature_model(**FEATURES[name])
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, n_heads=1)[0]
        for chunks in ([1] * 20, [7, 1, 5, 3, 4]):
            assert (incremental(model, ids, chunks) - full).abs().max() < 3e-5


def test_rollback_restores_the_smear_and_the_cache():
    model = feature_model(**NANOCHAT)
    ids = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, n_heads=1)[0]
        cache = model.new_cache(1, 16)
        model(ids[:, :10], cache)
        model(torch.randint(0, 61, (1, 4)), cache)  # a rejected draft...
        cache.rollback(10)  # ...forgotten
        rest = model(ids[:, 10:], cache, n_heads=1)[0]
    assert (rest - full[:, 10:]).abs().max() < 3e-5


def test_a_token_outside_the_window_has_no_influence():
    # one short-window layer: position t sees only t-2..t, so token 0 cannot reach position 5
    model = feature_model(n_layers=1, window_pattern="S", window=3, head_layers=0)
    model.blocks[0].attn.window = 3  # the last layer is always full; make this one short
    ids = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 61
    with torch.no_grad():
        a, b = model(ids, n_heads=1)[0], model(other, n_heads=1)[0]
    assert torch.equal(a[0, 3:], b[0, 3:])  # beyond the window: identical
    assert not torch.allclose(a[0, 2], b[0, 2])  # within it: changed


@pytest.mark.parametrize("bad", [dict(window_pattern="SSXL", window=4), dict(window_pattern="SL"),
                                 dict(loop_layers=9), dict(n_think_loops=0), dict(smear=-1)])
def test_bad_feature_settings_are_one_line_errors(bad):
    with pytest.raises(MtplabError) as err:
        ModelConfig(**{**FEATURE_BASE, **bad})
    assert "\n" not in str(err.value)


def test_think_loops_change_compute_not_parameters():
    model = feature_model(**LOOPED)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(4))
    n_params = model.num_parameters()
    with torch.no_grad():
        three = model(ids, n_heads=1)[0]
        model.n_think_loops = 1
        one = model(ids, n_heads=1)[0]
        assert model.new_cache(1, 12).k.size(0) == 5 - 2 + 2 * 1 + 1  # + the head block
        model.n_think_loops = 6
        six = incremental(model, ids, [5, 1, 6])
        assert model.new_cache(1, 12).k.size(0) == 5 - 2 + 2 * 6 + 1
        assert (six - model(ids, n_heads=1)[0]).abs().max() < 3e-5
    assert model.num_parameters() == n_params
    assert not torch.allclose(three, one) and not torch.allclose(three, six)


def test_defaults_keep_the_plain_trunk():
    # every feature off: same parameter names as before the features existed
    names = set(dict(feature_model().named_parameters()))
    assert not any(n.split(".")[0] in ("value_embeds", "resid_lambdas", "smear_gate", "think_gate")
                   for n in names)
    assert "blocks.0.attn_norm.weight" in names and "blocks.0.attn.q_proj.weight" in names
