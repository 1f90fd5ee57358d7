"""The batched engine: rows that join and leave at different steps, each with its own length,
drafts and sampling parameters, give exactly what each request gives alone."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.errors import MtplabError
from mtplab.inference.engine import Engine, Request
from mtplab.inference.sampling import SamplingParams
from mtplab.models.transformer import Transformer
from tests.conftest import FEATURES
from tests.inference.conftest import Enumerator, plain_distribution

FAMILIES = {"parallel": dict(mtp="parallel", n_future=3, head_layers=1),
            "parallel-2-blocks": dict(mtp="parallel", n_future=3, head_layers=2),
            "sequential": dict(mtp="sequential", n_future=3),
            "medusa": dict(mtp="medusa", n_future=3), "slots": dict(mtp="slots", n_future=3)}
TRUNKS = {name: FEATURES[name] for name in ("plain", "windows", "smear", "value-embeds", "looped",
                                             "softcap", "nanochat")}
TRUNKS["gqa"] = dict(n_kv_heads=2)
TRUNKS["learned-positions"] = dict(pos="learned", norm="layernorm", bias=True)
# every family on the plain and the nanochat trunk, every trunk under parallel heads, and a few more
CASES = sorted({(f, t) for f in FAMILIES for t in ("plain", "nanochat")}
               | {("parallel", t) for t in TRUNKS}
               | {("sequential", "looped"), ("medusa", "gqa"), ("slots", "learned-positions"),
                  ("parallel-2-blocks", "windows"), ("sequential", "smear")})


def build(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, d_model=32, n_layers=4, n_heads=4, max_seq_len=48, init_std=0.3)
    model = Transformer(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # scalars and fresh heads off their neutral start
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.startswith("heads."):
                p.add_(0.3 * torch.randn_like(p))
    return model


@torch.no_grad()
def reference_greedy(model, prompt, n, eos_id=None):
    """Greedy decoding by full forwards, no cache: what every engine row must reproduce."""
    ids, out = list(prompt), []
    for _ in range(min(n, model.config.max_seq_len - len(prompt))):
        token = int(model(torch.tensor([ids]), n_heads=1)[0][0, -1].argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


def requests(n_draft, seed=3):
    """Prompts of different lengths and limits, some with fewer drafts than the engine allows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        length = int(torch.randint(1, 14, (1,), generator=g))
        prompt = torch.randint(0, 40, (length,), generator=g).tolist()
        out.append(Request(prompt, max_new_tokens=[3, 13, 7, 1, 9, 24][i], n_draft=min(n_draft, i % 3)))
    out[1].n_draft = n_draft
    return out


def run(engine, reqs, join_at):
    """Submit request i at step join_at[i]; every row's tokens."""
    rows, tokens, step = {}, {}, 0
    while len(rows) < len(reqs) or engine.busy:
        for i, r in enumerate(reqs):
            if join_at[i] == step:
                rows[i] = engine.submit(r)
                tokens[i] = []
        for row, event in engine.step():
            i = next(k for k, v in rows.items() if v is row)
            tokens[i] += event.tokens
        step += 1
        assert step < 500
    return [tokens[i] for i in range(len(reqs))]


@pytest.mark.parametrize("family,trunk", CASES)
def test_rows_joining_and_leaving_give_their_batch_1_tokens(family, trunk):
    model = build(**{**TRUNKS[trunk], **FAMILIES[family]})
    want = [reference_greedy(model, r.prompt, r.max_new_tokens) for r in requests(2)]
    for n_draft in (0, 2):  # plain and speculative
        engine = Engine(model, max_batch=3, n_draft=n_draft)
        got = run(engine, requests(n_draft), join_at=[0, 0, 1, 2, 2, 5])
        assert got == want, (family, trunk, n_draft)
        assert not engine.rows and engine.cache.batch == 3  # every row freed, one cache


def test_eos_and_limits_end_each_row_on_its_own():
    model = build(mtp="parallel", n_future=3)
    reqs = requests(2)
    alone = reference_greedy(model, reqs[1].prompt, 40)
    cut = next(i for i in range(1, len(alone)) if alone[i] not in alone[:i])
    for r in reqs:
        r.eos_id = alone[cut]  # row 1 meets it after `cut` tokens
    got = run(Engine(model, max_batch=6, n_draft=2), reqs, join_at=[0] * 6)
    assert got == [reference_greedy(model, r.prompt, r.max_new_tokens, r.eos_id) for r in reqs]
    assert len(got[1]) == cut and len(got[3]) <= 1


def test_a_cancelled_row_frees_its_slot_and_the_others_go_on():
    model = build(mtp="medusa", n_future=3)
    engine = Engine(model, max_batch=2, n_draft=2)
    reqs = requests(2)
    a, b, c = (engine.submit(reqs[i]) for i in (1, 4, 5))
    engine.step()
    assert len(engine.rows) == 2 and list(engine.waiting) == [c]
    engine.cancel(a)
    tokens = {id(b): [], id(c): []}
    while engine.busy:
        for row, event in engine.step():
            assert row is not a
            tokens[id(row)] += event.tokens
        assert len(engine.rows) <= 2
    assert a.cancelled and not engine.rows
    assert tokens[id(c)] == reference_greedy(model, reqs[5].prompt, reqs[5].max_new_tokens)


def test_bad_engine_settings():
    model = build(mtp="parallel", n_future=3)
    with pytest.raises(MtplabError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(MtplabError, match="n_draft"):
        Engine(model, n_draft=3)
    with pytest.raises(MtplabError, match="at most 1"):
        Engine(model, n_draft=1).submit(Request([1, 2], n_draft=2))


def row_distribution(model, engine_draft, target, other, params, n):
    """Enumerate every path of request `target` while `other` (another length and sampling)
    decodes beside it in the same batch along a fixed path."""
    dist, script = {}, []
    while script is not None:
        chance = Enumerator(script)
        engine = Engine(model, max_batch=2, n_draft=engine_draft)
        mine = engine.submit(Request(target, n, params, n_draft=engine_draft, chance=chance))
        engine.submit(Request(other, n + 2, SamplingParams(temperature=0.8, top_k=2),
                              n_draft=1, chance=Enumerator([])))
        out = []
        while engine.busy:
            out += [t for row, event in engine.step() if row is mine for t in event.tokens]
        dist[tuple(out)] = dist.get(tuple(out), 0.0) + chance.prob
        script = chance.next_script()
    return dist


@pytest.mark.parametrize("family", ["parallel", "sequential", "medusa", "slots"])
def test_each_row_samples_exactly_head_0s_distribution(family):
    model = build(vocab_size=3, n_layers=2, mtp=family, n_future=3).double()
    for prompt, other, params in [([0, 2], [1, 1, 0, 2, 1], SamplingParams(temperature=1.0)),
                                  ([2, 1, 1, 0], [0], SamplingParams(temperature=0.7, top_p=0.8))]:
        exact = plain_distribution(model, prompt, 3, params)
        got = row_distribution(model, 2, prompt, other, params, 3)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
        assert max(abs(got.get(k, 0.0) - v) for k, v in exact.items()) < 1e-6, family


@pytest.mark.parametrize("family,trunk", CASES)
def test_rows_sharing_a_prompt_start_reuse_its_cache_and_still_give_their_batch_1_tokens(family, trunk):
    """Later prompts that begin like a decoding row's (a system prompt, a chat's earlier turns)
    copy its keys and values for that start; every row's tokens are still its batch-1 tokens."""
    model = build(**{**TRUNKS[trunk], **FAMILIES[family]})
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(0, 40, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 40, (n,), generator=g).tolist() for n in (3, 1, 5, 2)]
    prompts[3] = prompts[0] + [5, 6]  # a later turn: the first row's whole prompt and more
    want = [reference_greedy(model, p, 8) for p in prompts]
    for n_draft in (0, 2):
        engine = Engine(model, max_batch=4, n_draft=n_draft, reuse_prefix=4)
        reqs = [Request(p, max_new_tokens=[20, 8, 8, 8][i], n_draft=n_draft) for i, p in enumerate(prompts)]
        got = run(engine, reqs, join_at=[0, 1, 2, 2])
        assert [g[:8] for g in got] == want, (family, trunk, n_draft)
    # how much was reused: the joiners' shared start (a drafter reads every position itself)
    engine = Engine(model, max_batch=4, n_draft=2, reuse_prefix=4)
    first = engine.submit(Request(prompts[0], max_new_tokens=20, n_draft=2))
    engine.step()
    later = engine.submit(Request(prompts[3], max_new_tokens=4, n_draft=2))
    engine.step()
    expected = 0 if family == "sequential" else len(prompts[0])
    assert later.reused == expected and first.reused == 0
    off = Engine(model, max_batch=4, n_draft=2, reuse_prefix=0)
    off.submit(Request(prompts[0], max_new_tokens=20, n_draft=2))
    off.step()
    assert off.submit(Request(prompts[3], max_new_tokens=4, n_draft=2)).reused == 0


def test_a_long_reused_start_beside_a_long_new_prompt_stays_inside_the_cache():
    """Prefilled together, a row that reused 40 positions and reads 1 more, and a row that reads
    30: the short one is not padded past the cache's end, and both give their batch-1 tokens."""
    model = build(mtp="parallel", n_future=3)
    g = torch.Generator().manual_seed(9)
    donor = torch.randint(0, 40, (40,), generator=g).tolist()
    prompts = [donor + [3], torch.randint(0, 40, (30,), generator=g).tolist()]
    engine = Engine(model, max_batch=3, n_draft=2, reuse_prefix=4)
    engine.submit(Request(donor, max_new_tokens=6, n_draft=2))
    engine.step()
    rows = [engine.submit(Request(p, max_new_tokens=5, n_draft=2)) for p in prompts]
    got = {id(r): [] for r in rows}
    while engine.busy:
        for row, event in engine.step():
            got.get(id(row), []).extend(event.tokens)
    assert [got[id(r)] for r in rows] == [reference_greedy(model, p, 5) for p in prompts]
    assert rows[0].reused == 40 and engine.cache.max_len == 48 + 2


def test_rows_that_fit_a_kv_budget_are_what_the_engine_allocates():
    from mtplab.inference.engine import rows_that_fit

    model = build(mtp="parallel", n_future=3)
    one = Engine(model, max_batch=1, n_draft=2).cache
    per_row = one.k.nbytes + one.v.nbytes + one.ids.nbytes
    assert rows_that_fit(model, 2, 5 * per_row) == 5
    assert rows_that_fit(model, 2, 5 * per_row - 1) == 4
    assert rows_that_fit(model, 2, 1) == 1 and rows_that_fit(model, 2, 10**12) == 64
    cache = Engine(model, max_batch=5, n_draft=2).cache
    assert cache.k.nbytes + cache.v.nbytes + cache.ids.nbytes <= 5 * per_row
