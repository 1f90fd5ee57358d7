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
the accepted length after each step. The engine (engine.py) runs these steps for many rows at once;
this module holds what one row needs: the rule and its statistics (the DeepSeek depths' per-row
drafter lives with its family, in models/heads.py).

Drafts: parallel and Medusa heads read the trunk at the last accepted position (all computed in the
same pass);
sequential (DeepSeek) depths run one after another, depth k reading depth k-1 and the embedding of
the token drafted by depth k-1, each with its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch



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
    """What decoding one or more prompts took. tau (`tokens_per_forward`) is the tokens each
    *decoding* forward yields, accepted drafts plus head 0's own token, the end-of-text included:
    exactly 1 for plain decoding. The prompt's forward (which also gives the first token) is
    counted apart, in `prefills`."""

    forwards: int = 0  # decoding forward passes (the prompt's not included)
    tokens: int = 0  # new tokens, as returned (the first included, the end-of-text not)
    decoded: int = 0  # tokens the decoding forwards yielded: tau's numerator
    prefills: int = 0  # forwards that read a prompt (one per prompt, however many chunks)
    # per draft position i: forwards whose verification reached draft i (drafts < i all accepted),
    # and those that accepted it; their ratio is the acceptance rate given the earlier drafts passed
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.decoded / max(self.forwards, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "prefill_forwards": self.prefills, "tokens": self.tokens,
                "tokens_per_forward": self.tokens_per_forward,
                "acceptance_by_position": self.acceptance_by_position,
                "tokens_per_s": self.tokens_per_second}


def verify_row(row, head0: torch.Tensor, greedy: list[int],
               probs: torch.Tensor | None) -> tuple[list[int], list[bool]]:
    """One row's step: its drafts checked in order against head 0 (head0 [T, V], greedy its
    argmax per position), up to the first rejection; when all pass, head 0's bonus token.
    The new tokens and, per token, whether it was an accepted draft (all count towards tau, the
    end-of-text and tokens past the length limit included: they measure the forward, not the answer).
    `probs` [T, V]: a sampling row's head-0 distributions after its temperature/top-k/top-p (the
    engine computes them for every position and every row that shares parameters in one call);
    None for a greedy row."""
    n = len(row.drafts)
    new, flags = [], []
    for i, d in enumerate(row.drafts):
        row.stats.proposed[i] += 1
        if probs is None:
            ok, t = greedy[i] == d, greedy[i]
        else:
            ok, t = verify(probs[i], row.qs[i], d, row.chance)
        new.append(t)
        flags.append(ok)
        if not ok:
            row.stats.decoded += len(new)
            return new, flags
        row.stats.accepted[i] += 1
    bonus = greedy[n] if probs is None else row.chance.draw(probs[n])
    row.stats.decoded += len(new) + 1
    return new + [bonus], flags + [False]
