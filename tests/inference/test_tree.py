"""Tree speculation: one forward verifies a tree of drafts, and the output is still head 0's."""

import pytest
import torch

from mtplab.errors import MtplabError
from mtplab.inference import engine as engine_module
from mtplab.inference import tree as tree_module
from mtplab.inference.engine import Engine, Request
from mtplab.inference.generate import generate_ids
from mtplab.inference.sampling import SamplingParams
from mtplab.inference.tree import DraftTree
from mtplab.models.kv_cache import KVCache
from mtplab.models.layers import tree_ancestors
from tests.conftest import FEATURES, feature_model
from tests.inference.conftest import (max_gap, plain_distribution, random_model, spec_ids,
                                      speculative_distribution)

TREE_FAMILIES = ["parallel", "medusa", "slots", "sequential"]  # the last grows its trees step by step
BUSHY = DraftTree.parse("0 1 2 0.0 0.1 1.0 0.0.0 0.1.0")


def test_tree_nodes_parents_children_and_pruning():
    tree = DraftTree.parse("1 0 0.1 0.0 1.0 0.0.0")
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))  # parents first, then ranks
    assert str(tree) == "0 1 0.0 0.1 1.0 0.0.0" and (tree.size, tree.depth) == (6, 3)
    assert tree.parents() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.children() == [[1, 2], [3, 4], [5], [6], [], [], []]
    assert tree.ranks_per_depth() == [2, 2, 1]
    assert tree.pruned(1).paths == ((0,), (1,)) and tree.pruned(0) is None
    assert DraftTree.chain(3).paths == ((0,), (0, 0), (0, 0, 0))
    logits = torch.tensor([[0.0, 5.0, 3.0, 1.0], [4.0, 0.0, 0.0, 2.0], [0.0, 0.0, 9.0, 0.0]])
    assert tree.tokens(logits) == [1, 2, 0, 3, 0, 2]  # node (r1, r2, ...) takes head k's rank r_k
    for bad, message in [("", "at least one node"), ("0.1", "no parent"), ("0 x", "rank paths"),
                         ("-1", ">= 0")]:
        with pytest.raises(MtplabError, match=message):
            DraftTree.parse(bad)


def test_ancestors_of_a_tree_and_of_a_chain():
    parents = torch.tensor([[-1, 0, 0, 1, 1, 3], [-1, 0, 1, 2, 3, 4]])
    within = tree_ancestors(parents)
    expected = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 1, 3, 5]}
    for t, ancestors in expected.items():
        assert within[0, t].nonzero()[:, 0].tolist() == ancestors
    assert torch.equal(within[1], torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def path_of(parents, t):
    path = []
    while t >= 0:
        path.append(t)
        t = parents[t]
    return path[::-1]


@pytest.mark.parametrize("case", list(FEATURES))
def test_every_tree_node_sees_exactly_its_branch(case):
    """A tree of new tokens after a cached prompt, two rows at different lengths, one of them a
    tree and one a chain: each node's hidden states equal a plain forward of prompt + its branch,
    for every trunk feature (windows, smear, value embeddings, loops, GQA, softcap, ...)."""
    model = feature_model(**FEATURES[case])
    n_heads = 1 if model.config.mtp == "sequential" else model.n_future
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 61, (1, n), generator=g) for n in (9, 6)]
    tree = DraftTree.parse("0 1 0.0 0.1 1.0 0.0.0")
    parents = [tree.parents(), list(range(-1, tree.size))]  # row 1: the same width as a chain
    new = torch.randint(0, 61, (2, tree.size + 1), generator=g)
    with torch.no_grad():
        cache = model.new_cache(batch=2, max_len=32)
        for r, x in enumerate(prompts):
            view = cache.view(r, r + 1)
            model.hidden_states(x, view, n_heads)
            cache.lengths[r] = view.lengths[0]
        got = model.hidden_states(new, cache, n_heads, parents=torch.tensor(parents))
        for r in range(2):
            for t in range(tree.size + 1):
                branch = new[r, path_of(parents[r], t)]
                alone = model.hidden_states(torch.cat([prompts[r][0], branch])[None], None, n_heads)
                for k in range(n_heads):
                    delta = (got[k][r, t] - alone[k][0, -1]).abs().max().item()
                    assert delta < 1e-5, (case, r, t, k, delta)


def test_keep_path_moves_the_accepted_branch_into_place():
    cache = KVCache(n_layers=2, batch=2, n_kv_heads=1, max_len=10, head_dim=1)
    cache.k[:, :, 0, :, 0] = torch.arange(10.0)
    cache.ids[:] = torch.arange(10)
    cache.lengths = [3, 3]
    cache.keep_path(1, 3, [0, 2, 5])
    assert cache.lengths == [3, 6]
    assert cache.k[0, 1, 0, :6, 0].tolist() == [0, 1, 2, 3, 5, 8] and cache.ids[1, :6].tolist() == [0, 1, 2, 3, 5, 8]
    assert cache.k[1, 1, 0, :6, 0].tolist() == [0, 1, 2, 3, 5, 8]
    assert cache.k[0, 0, 0, :, 0].tolist() == list(range(10))  # other rows untouched


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_greedy_tree_output_equals_plain(family):
    model = random_model(family, vocab=12, heads=4, seed=5)
    g = torch.Generator().manual_seed(0)
    for n in (1, 4, 9):
        prompt = torch.randint(0, 12, (n,), generator=g).tolist()
        for tree in (BUSHY, DraftTree.default(3), DraftTree.parse("3 3.2")):
            assert spec_ids(model, prompt, 20, tree=tree) == generate_ids(model, prompt, 20), (n, tree)


def oracle_model(family):
    """Heads trained to be right (their drafts are head 0's later tokens) so that deep branches
    are accepted: a tiny model memorises one repeating sequence."""
    from mtplab.training.losses import backward_heads

    model = random_model(family, vocab=12, heads=4, seed=1).train()
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 3])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(80):
        opt.zero_grad()
        backward_heads(model, seq[:, :-1], seq[:, 1:], [1.0] * 4)
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_trained_heads_accept_deep_branches_and_rows_batch(family):
    """Heads that have learnt the sequence: the tree takes fewer forwards than the chain; rows of
    different prompt lengths, trees, chains and plain rows in one batch each give their batch-1
    greedy tokens."""
    model = oracle_model(family)
    prompts = [[3, 1, 4], [5, 9, 2, 6, 5], [1], [9, 7, 9, 3, 2, 3, 8]]

    def run(tree):
        engine = Engine(model, max_batch=3, n_draft=3, tree=tree)
        rows = [engine.submit(Request(p, 18, n_draft=n)) for p, n in zip(prompts, (3, 3, 0, 2))]
        out = {id(r): [] for r in rows}
        while engine.busy:
            for r, event in engine.step():
                out[id(r)] += event.tokens
        for p, r in zip(prompts, rows):
            assert out[id(r)] == generate_ids(model, p, 18)
        return [r.stats for r in rows]

    tree, chain = run(BUSHY), run(None)
    assert tree[2].tokens_per_forward == 1.0  # the plain row
    assert sum(s.forwards for s in tree) < sum(s.forwards for s in chain)


@pytest.mark.parametrize("family", TREE_FAMILIES)
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=2),
                                    SamplingParams(temperature=1.0, top_p=0.8)], ids=["t1", "topk", "topp"])
def test_tree_sampling_has_exactly_head_0s_distribution(family, params, monkeypatch):
    """Every random decision enumerated (tiny vocabulary, depth-2 trees with 2-3 children): the
    distribution over outputs equals plain sampling's closed form; a Medusa-style rule that
    accepts each child on its own probability without renormalising is caught."""
    model = random_model(family, vocab=3, heads=3, seed=2).double()
    prompt, tree = [0, 2], DraftTree.parse("0 1 2 0.0 0.1 1.0")
    plain = plain_distribution(model, prompt, 3, params)
    got = speculative_distribution(model, prompt, 3, params, tree=tree)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    assert max_gap(got, plain) < 1e-6

    real = tree_module.verify_tree

    def no_renormalising(row, tree, head0, greedy, probs):  # every sibling tried against the untouched p
        return real(row, tree, head0, greedy, _Frozen(probs))

    monkeypatch.setattr(engine_module, "verify_tree", no_renormalising)
    assert max_gap(speculative_distribution(model, prompt, 3, params, tree=tree), plain) > 1e-3


class _Frozen:
    """A distribution that ignores the rejected-sibling update (a wrong verification rule)."""

    def __init__(self, probs):
        self.probs = probs

    def __getitem__(self, i):  # a node's row of every node's distributions stays frozen
        return _Frozen(self.probs[i]) if self.probs.dim() > 1 else self.probs[i]

    def __setitem__(self, i, value):
        pass

    def clone(self):
        return self

    def sum(self):
        return self.probs.sum()

    def __truediv__(self, other):
        return self.probs / other


def test_seeded_tree_sampling_is_reproducible_and_matches_plain_statistics():
    model = random_model("parallel", vocab=5, heads=3, seed=4)
    params = SamplingParams(temperature=0.9, top_k=4, top_p=0.9)
    prompt, n, runs = [1, 3], 2, 1500
    counts = {}
    for seed in range(runs):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
        out = tuple(spec_ids(model, prompt, n, p, tree=BUSHY.pruned(2)))
        counts[out] = counts.get(out, 0) + 1
    assert spec_ids(model, prompt, n, SamplingParams(0.9, 4, 0.9, seed=7), tree=BUSHY.pruned(2)) == \
        spec_ids(model, prompt, n, SamplingParams(0.9, 4, 0.9, seed=7), tree=BUSHY.pruned(2))
    exact = plain_distribution(model.double(), prompt, n, params)
    tv = 0.5 * sum(abs(counts.get(k, 0) / runs - v) for k, v in exact.items())
    assert tv < 0.05, tv


def test_a_tree_deeper_than_the_heads_is_refused():
    model = random_model("parallel", vocab=12, heads=3)
    with pytest.raises(MtplabError, match="3 deep; the model has 2 draft heads"):
        Engine(model, n_draft=2, tree=DraftTree.chain(3))


def test_a_grown_tree_one_wide_is_the_chain_and_wider_trees_keep_their_likeliest_nodes():
    """Sequential depths grow their tree step by step (SequentialDrafter.draft_tree): one wide and
    as many nodes as depths, it is exactly the greedy chain; wider, it is a tree (every node's
    parent kept) of `budget` nodes whose best first draft is the chain's."""
    model = oracle_model("sequential")
    prompt = [3, 1, 4, 1, 5]
    drafter = model.heads.drafter(model, 3, 64)
    trunk = model.hidden_states(torch.tensor([prompt]), n_heads=1)[0]
    drafter.accept(trunk, prompt + [generate_ids(model, prompt, 1)[0]])
    chain = []
    for k in range(1, 4):
        chain.append(int(drafter.draft_logits(k, chain).argmax()))
    grown = drafter.draft_tree(3, 1, 3)
    assert grown == [((0,), chain[0]), ((0, 0), chain[1]), ((0, 0, 0), chain[2])]
    wide = drafter.draft_tree(3, 3, 7)
    tree = DraftTree(tuple(p for p, _ in wide))  # refuses a node without its parent
    assert tree.size == 7 and tree.depth <= 3 and dict(wide)[(0,)] == chain[0]
    assert drafter.draft_tree(3, 1, 3) == grown  # drafting leaves the drafter's state as it was
