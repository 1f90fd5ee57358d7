"""Each head family learns its offset: on sequences x_{t+1} = perm(x_t), head k must output
perm^(k+1)(x_t), which differs from every other head's target."""

import pytest
import torch

from mtplab.config import ModelConfig
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
