"""Helpers the decoding tests share: small random models, and the exact output distribution of
the speculative decoder (every path through its random choices) beside plain sampling's."""

import itertools

import torch

from mtplab.config import ModelConfig
from mtplab.inference.generate import generate_speculative
from mtplab.inference.sampling import SamplingParams, next_token_probs
from mtplab.inference.speculative import Randomness
from mtplab.models.transformer import Transformer


def spec_ids(model, prompt, n, params=SamplingParams(), **kw):
    """The token ids speculative decoding yields after `prompt`."""
    return [t for e in generate_speculative(model, prompt, n, params, **kw) for t in e.tokens]


def random_model(family, vocab=50, heads=4, seed=0):
    """A random two-layer model with `heads` draft heads of `family`, in eval mode."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                   mtp=family, n_future=heads)).eval()


class Enumerator(Randomness):
    """Walks one path of the decoder's decision tree, following `script` and then first choices."""

    def __init__(self, script):
        super().__init__()
        self.script, self.path, self.prob = script, [], 1.0

    def _choose(self, weights):
        options = [i for i, w in enumerate(weights) if w > 0]
        pick = self.script[len(self.path)] if len(self.path) < len(self.script) else 0
        self.path.append((pick, len(options)))
        self.prob *= weights[options[pick]]
        return options[pick]

    def draw(self, probs):
        return self._choose(probs.tolist())

    def accept(self, probability):
        return self._choose([probability, 1.0 - probability]) == 0

    def next_script(self):
        """The script of the next unexplored path (an odometer over the choices), None when done."""
        path = list(self.path)
        while path and path[-1][0] + 1 >= path[-1][1]:
            path.pop()
        return [p for p, _ in path[:-1]] + [path[-1][0] + 1] if path else None


def speculative_distribution(model, prompt, n, params, **options):
    """Every path of the decoder, with its probability, summed per output sequence."""
    dist, script = {}, []
    while script is not None:
        chance = Enumerator(script)
        out = tuple(spec_ids(model, prompt, n, params, chance=chance, **options))
        dist[out] = dist.get(out, 0.0) + chance.prob
        script = chance.next_script()
    return dist


def plain_distribution(model, prompt, n, params):
    """The exact probability of every `n`-token continuation under plain sampling from head 0."""
    V = model.config.vocab_size
    dist = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n):
            prob, ids = 1.0, list(prompt)
            for t in seq:
                logits = model(torch.tensor([ids]), n_heads=1)[0][0, -1]
                prob *= float(next_token_probs(logits.double(), params)[t])
                ids.append(t)
            dist[seq] = prob
    return dist


def max_gap(a, b):
    """The largest difference in probability between two distributions over sequences."""
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
