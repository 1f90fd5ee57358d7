"""Ragged batches: rows at different cache lengths, or left-padded with a key mask, compute
exactly what each row computes alone, for every trunk feature and head family."""

import pytest
import torch

from mtplab.models.kv_cache import KVCache
from tests.conftest import FEATURES, feature_model

FAMILIES = {"parallel": dict(mtp="parallel", n_future=3), "medusa": dict(mtp="medusa", n_future=3),
            "slots": dict(mtp="slots", n_future=3)}
CASES = {**FEATURES, **{f"heads-{k}": v for k, v in FAMILIES.items()},
         "gpt2-like": dict(pos="learned", norm="layernorm", bias=True, mtp="parallel", n_future=3)}
LENGTHS = (5, 11, 8)


def prompts(vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in LENGTHS]


def heads_for(model):
    return 1 if model.config.mtp == "sequential" else model.n_future  # depths need the later tokens


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_rows_equal_each_row_alone(case):
    model = feature_model(**CASES[case])
    rows, n_heads = prompts(), heads_for(model)
    width = max(LENGTHS)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    key_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, x in enumerate(rows):
        ids[r, width - x.size(1):], key_mask[r, width - x.size(1):] = x[0], True
    with torch.no_grad():
        batched = model(ids, n_heads=n_heads, key_mask=key_mask)
        for r, x in enumerate(rows):
            alone = model(x, n_heads=n_heads)
            for k in range(n_heads):
                delta = (batched[k][r, width - x.size(1):] - alone[k][0]).abs().max().item()
                assert delta < 1e-5, (case, r, k, delta)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_at_different_lengths_decode_as_alone(case):
    """Each row prefilled on its own into a shared cache, then three steps of 1 and 2 new tokens
    for every row at once (rows at different lengths): the same logits as each row alone."""
    model = feature_model(**CASES[case])
    rows, n_heads = prompts(), heads_for(model)
    more = torch.randint(0, 61, (len(rows), 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache(batch=len(rows))
        for r, x in enumerate(rows):
            view = cache.view(r, r + 1)
            model(x, view, n_heads=n_heads)
            cache.lengths[r] = view.lengths[0]
        done = 0
        for step in (1, 2, 1):
            got = model(more[:, done:done + step], cache, n_heads=n_heads)
            done += step
            for r, x in enumerate(rows):
                alone = model(torch.cat([x, more[r:r + 1, :done]], 1), n_heads=n_heads)
                for k in range(n_heads):
                    delta = (got[k][r] - alone[k][0, -step:]).abs().max().item()
                    assert delta < 1e-5, (case, step, r, k, delta)
        assert cache.lengths == [n + done for n in LENGTHS]


def test_ragged_writes_land_at_each_rows_length_and_rollback_per_row():
    cache = KVCache(n_layers=2, batch=3, n_kv_heads=1, max_len=8, head_dim=2)
    cache.lengths = [0, 3, 5]
    k = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 1, 2, 2)
    keys, _ = cache.update(1, k, k)
    assert keys.shape == (3, 1, 7, 2)
    for r, start in enumerate([0, 3, 5]):
        assert torch.equal(cache.k[1, r, :, start:start + 2], k[r])
        assert cache.k[1, r, :, :start].abs().sum() == 0 and cache.k[0].abs().sum() == 0
    cache.store_ids(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    cache.advance(2)
    assert cache.lengths == [2, 5, 7] and cache.previous_ids().flatten().tolist() == [2, 4, 6]
    cache.copy_row(2, 0)
    assert cache.lengths[0] == 7 and torch.equal(cache.k[:, 0, :, :7], cache.k[:, 2, :, :7])
    with pytest.raises(ValueError, match="different lengths"):
        cache.length
    with pytest.raises(ValueError, match="holds 8 positions"):
        cache.update(0, torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2))


@pytest.mark.parametrize("case", [*CASES, "two-layer-heads"])
def test_outputs_at_one_position_per_row_equal_the_full_forward_and_fill_the_same_cache(case):
    """A prefill that reads one position per row (the engine's) gets the heads' states there and
    leaves the cache exactly as the full forward does: the next step's logits agree."""
    config = dict(mtp="parallel", n_future=3, head_layers=2) if case == "two-layer-heads" else CASES[case]
    model = feature_model(**config)
    rows, n_heads = prompts(), heads_for(model)
    width = max(LENGTHS)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, :x.size(1)] = x[0]  # right-padded: what follows a row's end is never read
    last = torch.tensor([n - 1 for n in LENGTHS])
    step = torch.randint(0, 61, (len(rows), 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_cache, kept_cache = model.new_cache(batch=len(rows)), model.new_cache(batch=len(rows))
        full = model.hidden_states(ids, full_cache, n_heads, with_trunk=True)
        kept = model.hidden_states(ids, kept_cache, n_heads, with_trunk=True, outputs_at=last)
        for k in range(n_heads):
            assert kept[k].shape == (len(rows), 1, full[k].size(-1))
            assert (kept[k][:, 0] - full[k][torch.arange(len(rows)), last]).abs().max() < 1e-5, (case, k)
        assert torch.equal(kept[-1], full[-1])  # the trunk's output stays whole
        for cache in (full_cache, kept_cache):
            cache.lengths = list(LENGTHS)
        after_full = model(step, full_cache, n_heads=n_heads)
        after_kept = model(step, kept_cache, n_heads=n_heads)
    for a, b in zip(after_full, after_kept):
        assert (a - b).abs().max() < 1e-5, case
