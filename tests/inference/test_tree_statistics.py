"""Tree speculation on a trained model, at temperature 1, checked from samples as a user could: 2,000
completions decoded with a tree against 2,000 decoded plain, their total variation distance no
larger than that between two plain samples (the control) by more than chance allows. The exact
tests (test_tree.py) enumerate every outcome of untrained models with three-token vocabularies;
this one samples a model whose heads have learnt something, so that deep branches and second
guesses are accepted as they are in use, and shows that the check catches a wrong rule."""

import math
from collections import Counter

import torch

from mtplab.config import ModelConfig
from mtplab.inference.engine import Engine, Request
from mtplab.inference.sampling import SamplingParams
from mtplab.inference.speculative import Randomness
from mtplab.inference.tree import DraftTree
from mtplab.models.transformer import Transformer
from mtplab.training.losses import backward_heads

SAMPLES = 2000
NEW_TOKENS = 3  # the prompt's forward gives the first; the first tree step gives the next one or two
TREE = DraftTree.parse("0 1 2 0.0 0.1 1.0")  # three guesses of head 1, two of head 2 after the best
VOCAB = 12
# A tiny vocabulary's Markov chain, each token followed by one of three others (60/30/10 %): text
# whose next tokens are uncertain enough at temperature 1 for drafts to be rejected as often as
# accepted, with few enough likely continuations (about a hundred 3-token ones) for 2,000 samples
# to estimate their distribution. (The tiny recipe's model spreads its next token over dozens.)
CHOICES = torch.tensor([0.6, 0.3, 0.1])
# Two samples of n whose distance is a function of their 2n draws, each moving it by at most 1/n:
# McDiarmid's inequality puts it within t of its mean with probability >= 1 - exp(-n t^2) either
# way. With the tree lossless, tree-vs-plain and control-vs-plain have the same mean (both compare
# an independent plain-distributed sample to the same plain one), so the tree exceeds the control
# by more than 2t with probability at most 2 exp(-n t^2): 1e-6 for this margin (0.17 at n = 2,000).
# That is coarse (it catches wrong rules that move a lot of mass, such as always accepting; the
# exact tests catch subtle ones) but holds whatever the distribution, with no asymptotics.
FALSE_ALARM = 1e-6
MARGIN = 2 * math.sqrt(math.log(2 / FALSE_ALARM) / SAMPLES)


def markov_text(rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    followers = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(t))[:3]
                             for t in range(VOCAB)])
    text = torch.empty(rows, length, dtype=torch.long)
    text[:, 0] = torch.randint(0, VOCAB, (rows,), generator=generator)
    for t in range(1, length):
        pick = torch.multinomial(CHOICES.expand(rows, 3), 1, generator=generator)[:, 0]
        text[:, t] = followers[text[:, t - 1], pick]
    return text


def trained_model() -> Transformer:
    """Three heads trained for a few seconds on the chain: head 0 on its way to the 60/30/10 %,
    heads 1 and 2 guessing two and three tokens ahead well enough for drafts to be accepted often."""
    steps, batch = 100, 32
    text = markov_text(steps * batch, 17, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                                    mtp="parallel", n_future=3)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = text[step * batch:(step + 1) * batch]
        opt.zero_grad()
        backward_heads(model, x[:, :-1], x[:, 1:], [1.0] * 3)
        opt.step()
    return model.eval()


class Credulous(Randomness):
    """A wrong verification rule: every draft is accepted (so a tree step follows its first child)."""

    def accept(self, probability: float) -> bool:
        return True


def completions(model, prompt, first_seed, tree=None, chance=Randomness):
    """SAMPLES completions, every row with its own seed (first_seed, first_seed + 1, ...), decoded
    together as rows of one engine; the outcome counts and the tree steps' accepted branches."""
    n_draft = tree.depth if tree is not None else 0
    engine = Engine(model, max_batch=SAMPLES, n_draft=n_draft, tree=tree)
    rows = []
    for i in range(SAMPLES):
        params = SamplingParams(temperature=1.0, seed=first_seed + i)
        rows.append(engine.submit(Request(prompt, NEW_TOKENS, params, n_draft=n_draft,
                                          chance=chance(params.generator(model.device)))))
    tokens, branches = {id(r): [] for r in rows}, Counter()
    while engine.busy:
        for row, event in engine.step():
            tokens[id(row)] += event.tokens
            if event.branch is not None:
                branches[event.branch] += 1
    return Counter(tuple(tokens[id(r)]) for r in rows), branches


def total_variation(a: Counter, b: Counter) -> float:
    return 0.5 * sum(abs(a[k] - b[k]) for k in a.keys() | b.keys()) / SAMPLES


def test_tree_sampling_matches_plain_sampling_as_closely_as_plain_matches_itself():
    model = trained_model()
    prompt = markov_text(1, 4, torch.Generator().manual_seed(2))[0].tolist()  # a likely start
    plain, _ = completions(model, prompt, 0)
    control, _ = completions(model, prompt, SAMPLES)
    tree, branches = completions(model, prompt, 2 * SAMPLES, TREE)
    wrong, _ = completions(model, prompt, 3 * SAMPLES, TREE, Credulous)

    # the samples exercise the tree: branches two deep, and second or third guesses, were accepted
    assert sum(n for b, n in branches.items() if len(b) == 2) > 50
    assert sum(n for b, n in branches.items() if b and max(b) > 0) > 50
    assert sum(branches[b] for b in branches if not b) > 50  # ... and every draft rejected, too

    noise = total_variation(control, plain)
    assert total_variation(tree, plain) <= noise + MARGIN, (total_variation(tree, plain), noise)
    assert total_variation(wrong, plain) > noise + MARGIN, (total_variation(wrong, plain), noise)
