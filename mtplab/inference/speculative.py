"""Lossless self-speculative decoding with the model's own heads (blockwise parallel decoding).

Each trunk forward reads the pending token plus the drafts made at the previous step, so one pass
both verifies the old block and yields the hidden states that draft the next one:

    inputs   c   d1  d2  d3          c = last accepted token, d = drafts
    head 0   v1  v2  v3  v4          v_i verifies d_i; v4 is the bonus when all pass

Verification is Leviathan et al.'s rule applied to head 0's distribution p (after temperature,
top-k, top-p, exactly as plain sampling applies them): accept draft x with min(1, p(x)/q(x)), where
q is the head's distribution it was drawn from; on rejection draw from norm(max(0, p - q)) and stop.
Greedy decoding is the one-hot limit: accept iff x = argmax p. Output is therefore token-for-token
plain greedy decoding, or exactly head 0's distribution when sampling. The KV cache rolls back to
the accepted length after each step.

Drafts: parallel and Medusa heads read the trunk at the last accepted position (all computed in the
same pass);
sequential (DeepSeek) depths run one after another, depth k reading depth k-1 and the embedding of
the token drafted by depth k-1, each with its own KV cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import MtplabError
from ..models.kv_cache import KVCache
from ..models.transformer import Transformer
from .generate import Event, fit_prompt
from .sampling import SamplingParams, next_token_probs


class Randomness:
    """The decoder's only source of chance; a test can replace it to enumerate every outcome."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, probability: float) -> bool:
        device = self.generator.device if self.generator is not None else "cpu"
        return float(torch.rand((), generator=self.generator, device=device)) < probability


def verify(p: torch.Tensor, q: torch.Tensor, draft: int, chance: Randomness) -> tuple[bool, int]:
    """Accept `draft` (drawn from q) with min(1, p/q); otherwise draw from norm(max(0, p - q))."""
    p_x, q_x = float(p[draft]), float(q[draft])
    if chance.accept(min(1.0, p_x / q_x) if q_x > 0 else 0.0):
        return True, draft
    residual = (p - q).clamp_min(0.0)
    if float(residual.sum()) <= 0:  # p == q: rejection had probability 0
        residual = p
    return False, chance.draw(residual / residual.sum())


@dataclass
class SpeculativeStats:
    forwards: int = 0  # trunk forward passes, the prompt's included
    tokens: int = 0
    # per draft position i: forwards whose verification reached draft i (drafts < i all accepted),
    # and those that accepted it; their ratio is the acceptance rate given the earlier drafts passed
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "tokens": self.tokens,
                "tokens_per_forward": self.tokens_per_forward,
                "acceptance_by_position": self.acceptance_by_position,
                "tokens_per_s": self.tokens_per_second}


class ParallelDrafter:
    """Heads 1..m read the trunk output; every head's block shares the trunk's cache in lockstep."""

    def __init__(self, model: Transformer, cache: KVCache, n_draft: int):
        self.model, self.cache, self.n_heads = model, cache, 1 + n_draft

    def forward(self, inputs: list[int]) -> torch.Tensor:
        ids = torch.tensor([inputs], device=self.model.device)
        self.start = self.cache.length
        self.hidden = self.model.hidden_states(ids, self.cache, self.n_heads)  # each [1, n, D]
        return self.model.logits(self.hidden[0][0])  # [n, V]

    def commit(self, n_keep: int, tokens: list[int]) -> None:
        self.cache.rollback(self.start + n_keep)
        self.pos = n_keep - 1

    def draft_logits(self, k: int, drafts: list[int]) -> torch.Tensor:
        if not self.model.heads.shared_unembedding:  # Medusa: a projection per head
            return self.model.head_logits(k, self.hidden[k][0, self.pos])
        if k == 1:  # every head's draft in one unembedding call
            rows = torch.stack([h[0, self.pos] for h in self.hidden[1:]])  # [n_draft, D]
            self.drafts = self.model.logits(rows)
        return self.drafts[k - 1]


class SequentialDrafter:
    """Depth k at position t needs h^{k-1}_t and token t+k. Positions whose token t+k is already
    accepted are kept (in `history` and the depth's cache); later ones use drafts and are redone."""

    def __init__(self, model: Transformer, cache: KVCache, n_draft: int):
        self.model, self.cache = model, cache
        c = model.config
        self.caches = [KVCache(1, 1, c.kv_heads, cache.max_len, c.head_dim, model.device,
                               cache.k.dtype) for _ in range(n_draft)]
        self.history: list[torch.Tensor | None] = [None] * (n_draft + 1)  # kept hidden per depth
        self.out: torch.Tensor | None = None

    def forward(self, inputs: list[int]) -> torch.Tensor:
        ids = torch.tensor([inputs], device=self.model.device)
        self.start = self.cache.length
        self.new_h0 = self.model.hidden_states(ids, self.cache, 1)[0]  # [1, n, D]
        return self.model.logits(self.new_h0[0])

    def commit(self, n_keep: int, tokens: list[int]) -> None:
        self.cache.rollback(self.start + n_keep)
        self.history[0] = _append(self.history[0], self.new_h0[:, :n_keep])
        self.tokens = tokens  # every accepted token, the pending one included
        self.out = None

    def draft_logits(self, k: int, drafts: list[int]) -> torch.Tensor:
        n = self.history[0].size(1)  # trunk positions 0..n-1 are accepted; tokens[n] is pending
        cache = self.caches[k - 1]
        first = cache.length  # depth k keeps positions [0, first)
        if k == 1:
            h_in = self.history[0][:, first:n]
        else:  # depth k-1 at [first, n): kept earlier, then what it computed in this step
            h_in = _cat(self.history[k - 1][:, first:self.prev_first], self.out)
        following = (self.tokens[first + k:] + drafts)[:n - first]  # token t+k for t in [first, n)
        next_ids = torch.tensor([following], device=self.model.device)
        out = self.model.heads.run_module(k, h_in, next_ids, self.model.embed, self.model.rotary, cache)
        keep = max(0, n - k + 1) - first  # positions whose token t+k is accepted, not drafted
        self.history[k] = _append(self.history[k], out[:, :keep])
        cache.rollback(first + keep)
        self.out, self.prev_first = out, first
        return self.model.logits(out[0, -1])


def _append(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1) if a.size(1) else b


@torch.no_grad()
def generate_speculative(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                         params: SamplingParams = SamplingParams(), eos_id: int | None = None,
                         n_draft: int | None = None, chance: Randomness | None = None,
                         stats: SpeculativeStats | None = None) -> Iterator[Event]:
    """Decode with drafts from heads 1..n_draft, verified by head 0. Yields one event per forward."""
    most = model.n_future - 1
    n_draft = most if n_draft is None else n_draft
    if not 0 <= n_draft <= most:
        raise MtplabError(f"n_draft must be between 0 and {most} (the model has {model.n_future} heads)")
    prompt, max_new_tokens = fit_prompt(model, prompt, max_new_tokens)
    chance = chance or Randomness(params.generator(model.device))
    stats = stats if stats is not None else SpeculativeStats()
    stats.proposed = stats.proposed or [0] * n_draft
    stats.accepted = stats.accepted or [0] * n_draft
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    drafter = (SequentialDrafter if model.heads.chained else ParallelDrafter)(model, cache, n_draft)
    t0 = time.perf_counter()

    def pick(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if params.greedy:
            return int(logits.argmax()), None
        probs = next_token_probs(logits, params)
        return chance.draw(probs), probs

    token, _ = pick(drafter.forward(prompt)[-1])
    stats.forwards += 1
    if token == eos_id:
        stats.seconds += time.perf_counter() - t0
        yield Event([], finished=True)
        return
    # From here on the pending token `token` is the last of `tokens` and not yet in the cache.
    tokens, produced = prompt + [token], 1
    stats.tokens += 1
    drafter.commit(len(prompt), tokens)
    yield Event([token], finished=produced >= max_new_tokens)
    while produced < max_new_tokens:
        m = min(n_draft, max_new_tokens - produced)  # never draft past the token limit
        drafts, qs = [], []
        for k in range(1, m + 1):
            d, q = pick(drafter.draft_logits(k, drafts))
            drafts.append(d)
            qs.append(q)
        inputs = [token] + drafts
        head0 = drafter.forward(inputs)  # [m+1, V]
        stats.forwards += 1
        new, flags = [], []
        greedy_pred = head0.argmax(-1).tolist() if params.greedy else None
        for i, d in enumerate(drafts):
            stats.proposed[i] += 1
            if params.greedy:
                ok, t = greedy_pred[i] == d, greedy_pred[i]
            else:
                ok, t = verify(next_token_probs(head0[i], params), qs[i], d, chance)
            new.append(t)
            flags.append(ok)
            if not ok:
                break
            stats.accepted[i] += 1
        else:
            bonus, _ = pick(head0[len(drafts)])
            new.append(bonus)
            flags.append(False)
        n_acc = sum(flags)
        if eos_id in new:
            cut = new.index(eos_id)
            stats.tokens += cut
            stats.seconds += time.perf_counter() - t0
            yield Event(new[:cut], flags[:cut], drafts, finished=True)
            return
        new, flags = new[:max_new_tokens - produced], flags[:max_new_tokens - produced]
        produced += len(new)
        stats.tokens += len(new)
        tokens.extend(new)
        token = new[-1]
        drafter.commit(1 + n_acc, tokens)
        yield Event(new, flags, drafts, finished=produced >= max_new_tokens)
    stats.seconds += time.perf_counter() - t0
