"""Each head family learns its offset: on sequences x_{t+1} = perm(x_t), head k must output
perm^(k+1)(x_t), which differs from every other head's target."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.models.layout import ff_dim
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads

V, T, HEADS = 24, 24, 3


def chains(perm: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.empty(batch, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (batch,), generator=gen)
    for t in range(T):
        x[:, t + 1] = perm[x[:, t]]
    return x


@pytest.mark.parametrize("family", ["parallel", "sequential", "medusa", "slots"])
def test_head_k_predicts_token_t_plus_1_plus_k(family):
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(V, generator=gen)
    perm = torch.empty(V, dtype=torch.long)
    perm[order] = order.roll(-1)  # one cycle through all V tokens: perm^a(x) != perm^b(x)
    model = Transformer(ModelConfig(vocab_size=V, d_model=48, n_layers=1, n_heads=4, max_seq_len=T,
                                    mtp=family, n_future=HEADS, loss_weights=[1.0] * HEADS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        x = chains(perm, 32, gen)
        backward_heads(model, x[:, :-1], x[:, 1:], [1.0] * HEADS)
        opt.step()
        opt.zero_grad()
    model.eval()
    x = chains(perm, 16, gen)[:, :-1]
    with torch.no_grad():
        outs = model(x)
    powers = [x]
    for _ in range(HEADS + 1):
        powers.append(perm[powers[-1]])
    for k, logits in enumerate(outs):
        pred = logits.argmax(-1)
        n = pred.size(1)
        hits = {j: (pred == powers[j + 1][:, :n]).float().mean().item() for j in range(HEADS + 1)}
        assert hits[k] > 0.95, (family, k, hits)
        assert all(hits[j] < 0.2 for j in hits if j != k), (family, k, hits)


def test_zero_initialised_medusa_heads_start_as_head_0():
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=T,
                                    mtp="medusa", n_future=4)).eval()
    with torch.no_grad():
        outs = model(torch.randint(0, V, (2, 10)))
    for logits in outs[1:]:
        assert torch.allclose(logits, outs[0], atol=1e-6)
    untied = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=T,
                                     mtp="medusa", n_future=2, tie_embeddings=False)).eval()
    with torch.no_grad():
        a, b = untied(torch.randint(0, V, (1, 5)))
    assert torch.allclose(a, b, atol=1e-6)


# -- the interface every family answers ---------------------------------------------------------
FAMILY_NAMES = ["parallel", "sequential", "medusa", "slots"]


def small(family: str, **extra) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                   n_future=HEADS, mtp=family, **extra)).eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_gives_the_same_states_one_head_at_a_time_and_together(family):
    """hidden_all (batched, as decoding calls it) equals the training path's head-at-a-time
    hidden(k, trunk, prev) that the memory-saving backward uses."""
    model = small(family)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mask = model.attention_mask(ids)
        trunk = model.trunk(ids, mask)
        together = model.heads.hidden_all(HEADS, trunk, model._future(ids), model.rotary, mask, batched=True)
        prev, one_by_one = trunk, []
        for k in range(HEADS):
            prev = model.head_hidden(k, trunk, prev, ids, mask)
            one_by_one.append(prev)
    for a, b in zip(together, one_by_one):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    stacked = model.stacked_logits(one_by_one[1:2] * 2, first=1)  # [B, T', 2, V]: head 1 twice
    assert torch.allclose(stacked[..., 0, :], model.head_logits(1, one_by_one[1]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flops_count_each_vocabulary_projection_once(family):
    """All heads cost the next-token path plus every other head's own work and one unembedding
    each (Medusa's own lm_heads are its heads' unembeddings, not extra ones)."""
    from mtplab.models.summary import summarize

    config = small(family).config
    s = summarize(config, context=16)
    heads = s["flops_per_token_all_heads"] - s["flops_per_token_next_token"]
    unembed = 2 * config.d_model * config.vocab_size
    d, attention = config.d_model, 2 * 2 * 16 * config.d_model
    block = 2 * (4 * d * d + 2 * d * ff_dim(config)) + attention
    expected = {"parallel": (HEADS - 1) * (block + unembed),
                "sequential": (HEADS - 1) * (block + 2 * 2 * d * d + unembed),
                "medusa": (HEADS - 1) * 2 * (d * d + d * V),
                "slots": (HEADS - 1) * (2 * (2 * d * d + d * d) + unembed)}[family]
    assert heads == expected


def test_sequential_depths_refuse_a_cache_and_padding_before_any_work():
    model = small("sequential")
    ids = torch.randint(0, V, (1, 4))
    cache = model.new_cache()
    with pytest.raises(ValueError, match="caches of their own"):
        model.hidden_states(ids, cache, n_heads=2)
    assert cache.lengths == [0]  # nothing was written
    with pytest.raises(ValueError, match="no padding"):
        model.hidden_states(ids, n_heads=2, key_mask=torch.ones(1, 4, dtype=torch.bool))
    assert len(model.hidden_states(ids, cache, n_heads=1)) == 1  # head 0 alone takes both
