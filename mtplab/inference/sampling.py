"""Turning logits into a next token: greedy, temperature, top-k, top-p (nucleus), seeded.

`next_token_probs` is the one definition of "the model's distribution" after filtering; plain
sampling draws from it, and speculative decoding verifies drafts against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MtplabError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MtplabError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MtplabError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MtplabError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, top-k and top-p."""
    # at least fp32 (bf16/fp16 logits are upcast); fp64 stays fp64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if torch.tensor(params.temperature, dtype=logits.dtype) == 0:  # below the dtype's range: greedy
        return F.one_hot(logits.argmax(-1), logits.size(-1)).to(logits.dtype)
    scaled = logits / params.temperature
    # a tiny temperature overflowed (a finite logit became inf): shift the maximum to 0 first.
    # -inf logits (padded vocabulary ids) stay -inf either way and get probability 0.
    if (torch.isinf(scaled) & torch.isfinite(logits)).any():
        scaled = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    logits = scaled
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop = before >= params.top_p
        drop[..., 0] = False  # even when top_p underflows the dtype
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if params.greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
