"""Speculative decoding never changes what head 0 would have said."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.inference import speculative
from mtplab.inference.generate import generate_ids
from mtplab.inference.sampling import SamplingParams
from mtplab.inference.generate import generate_speculative
from mtplab.inference.speculative import SpeculativeStats
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads
from tests.inference.conftest import (max_gap, plain_distribution, random_model, spec_ids,
                                      speculative_distribution)

FAMILIES = ["parallel", "sequential", "medusa", "slots"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_equals_plain_over_many_prompts(family):
    model = random_model(family)
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        prompt = torch.randint(0, 50, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()
        n_draft = int(torch.randint(0, 4, (1,), generator=gen))
        assert spec_ids(model, prompt, 24, n_draft=n_draft) == generate_ids(model, prompt, 24)


# the trunk families of the recipes: gelu-d12 (nanochat stack) and nrm-miniaxion (looped, low-rank)
TRUNKS = {
    "gelu-d12": dict(norm_affine=False, embed_norm=True, rope_base=1e5, qk_norm=True, qk_scale=1.2,
                     window_pattern="SSSL", window=4, value_embeds=True, ve_gate_channels=8,
                     layer_lambdas=True, smear=8, backout=True, logit_softcap=15.0, n_layers=4),
    "nrm-miniaxion": dict(n_layers=4, loop_layers=2, n_think_loops=3, low_rank=8, n_kv_heads=1,
                          mlp="swiglu"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("trunk", TRUNKS)
def test_greedy_output_equals_plain_on_every_recipe_trunk(family, trunk):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_heads=2, max_seq_len=64, mtp=family,
                                    n_future=4, **TRUNKS[trunk])).eval()
    with torch.no_grad():  # move the neutral-at-init scalars (lambdas, gates) off their start
        for p in model.parameters():
            if p.dim() < 2:
                p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(2)
    for loops in ([1, 3] if trunk == "nrm-miniaxion" else [1]):
        model.n_think_loops = loops  # changed at inference: the cache layout follows
        for _ in range(3):
            prompt = torch.randint(0, 50, (int(torch.randint(1, 12, (1,), generator=gen)),),
                                   generator=gen).tolist()
            n_draft = int(torch.randint(1, 4, (1,), generator=gen))
            assert spec_ids(model, prompt, 16, n_draft=n_draft) == generate_ids(model, prompt, 16)


@pytest.fixture(scope="module", params=FAMILIES)
def oracle(request):
    """A model trained on x_{t+1} = perm(x_t): every head is right, so every draft is."""
    V, T = 16, 32
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(V, generator=gen)
    perm = torch.empty(V, dtype=torch.long)
    perm[order] = order.roll(-1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=48, n_layers=1, n_heads=4, max_seq_len=64,
                                    mtp=request.param, n_future=4, loss_weights=[1.0] * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        x = torch.empty(32, T + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (32,), generator=gen)
        for t in range(T):
            x[:, t + 1] = perm[x[:, t]]
        backward_heads(model, x[:, :-1], x[:, 1:], [1.0] * 4)
        opt.step()
        opt.zero_grad()
    return model.eval(), perm


def test_right_heads_accept_every_draft(oracle):
    model, perm = oracle
    prompt = [3, int(perm[3]), int(perm[perm[3]])]
    stats = SpeculativeStats()
    out = spec_ids(model, prompt, 25, stats=stats)
    assert out == generate_ids(model, prompt, 25)
    assert stats.acceptance_by_position == [1.0, 1.0, 1.0]
    # the prompt's forward gives the first token; every decoding forward after it k + 1 = 4 (tau)
    assert (stats.prefills, stats.forwards, stats.tokens, stats.tokens_per_forward) == (1, 6, 25, 4.0)
    events = list(generate_speculative(model, prompt, 25))
    assert [len(e.tokens) for e in events] == [1, 4, 4, 4, 4, 4, 4]
    assert events[1].accepted == [True, True, True, False]
    assert events[1].drafts == events[1].tokens[:3]  # what was drafted is what was accepted


def test_wrong_heads_still_return_the_plain_output(oracle):
    model, perm = oracle
    broken = Transformer(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        if model.config.mtp == "parallel":  # head 1 now predicts t+4, head 3 predicts t+2
            heads = broken.heads.heads
            heads[1].load_state_dict(model.heads.heads[3].state_dict())
            heads[3].load_state_dict(model.heads.heads[1].state_dict())
        elif model.config.mtp == "sequential":  # the depths see noise, not the trunk and embedding
            for module in broken.heads.modules_:
                module.eh_proj.weight.normal_(0, 5.0)
        elif model.config.mtp == "slots":  # slots 1..3 see noise instead of the trunk state
            for slot in broken.heads.slots[1:]:
                slot.ff[0].weight.normal_(0, 5.0)
        else:  # Medusa: heads 1 and 3 swap their vocabulary projections
            lm = broken.heads.lm_heads
            lm[0].weight.copy_(model.heads.lm_heads[2].weight)
            lm[2].weight.copy_(model.heads.lm_heads[0].weight)
    prompt = [5, int(perm[5])]
    stats = SpeculativeStats()
    assert spec_ids(broken, prompt, 20, stats=stats) == generate_ids(broken, prompt, 20)
    assert stats.acceptance_by_position[0] < 0.2
    assert stats.tokens_per_forward < 1.3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2),
                                    SamplingParams(temperature=1.0, top_p=0.8)], ids=["t1", "topk", "topp"])
def test_exact_output_distribution_equals_head_0(family, params, monkeypatch):
    model = random_model(family, vocab=3, heads=3, seed=2).double()
    prompt = [0, 2]
    plain = plain_distribution(model, prompt, 3, params)
    assert sum(plain.values()) == pytest.approx(1.0)
    spec = speculative_distribution(model, prompt, 3, params)
    assert sum(spec.values()) == pytest.approx(1.0, abs=1e-9)
    assert max_gap(spec, plain) < 1e-6

    def wrong_verify(p, q, draft, chance):  # negative control: resample from p, not the residual
        if chance.accept(min(1.0, float(p[draft] / q[draft]))):
            return True, draft
        return False, chance.draw(p)

    monkeypatch.setattr(speculative, "verify", wrong_verify)
    assert max_gap(speculative_distribution(model, prompt, 3, params), plain) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_statistics_match_plain(family):
    model = random_model(family, vocab=5, heads=3, seed=4)
    params = SamplingParams(temperature=0.9, top_k=4, top_p=0.9)
    prompt, n, runs = [1, 3], 2, 1500
    counts = {}
    for seed in range(runs):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
        out = tuple(spec_ids(model, prompt, n, p))
        counts[out] = counts.get(out, 0) + 1
    empirical = {k: v / runs for k, v in counts.items()}
    exact = plain_distribution(model.double(), prompt, n, params)
    tv = 0.5 * sum(abs(empirical.get(k, 0.0) - v) for k, v in exact.items())
    assert tv < 0.05, tv
    assert set(empirical) <= {k for k, v in exact.items() if v > 0}  # filtered tokens never appear
