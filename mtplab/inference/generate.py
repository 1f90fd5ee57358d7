"""Plain autoregressive decoding with the KV cache, head 0 only, as a stream of events.

An event carries the tokens one model forward produced. Here that is always one computed token;
speculative decoding yields events with accepted draft tokens too, so every consumer (CLI, server,
chat page) handles both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import MtplabError
from ..models.transformer import Transformer
from .sampling import SamplingParams, sample


@dataclass
class Event:
    tokens: list[int]  # new tokens, in order
    accepted: list[bool] = field(default_factory=list)  # per token: an accepted draft, else computed
    drafts: list[int] = field(default_factory=list)  # the draft tokens this forward verified
    finished: bool = False  # eos reached (eos itself is not in tokens) or the token limit

    def __post_init__(self) -> None:
        if not self.accepted:
            self.accepted = [False] * len(self.tokens)


def fit_prompt(model: Transformer, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """Keep the prompt's last tokens (all of it when it fits, leaving room for one new token) and cap
    the new tokens to the room left in the context window."""
    if not prompt:
        raise MtplabError("the prompt is empty")
    if max_new_tokens < 1:
        raise MtplabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    window = model.config.max_seq_len
    prompt = prompt[-(window - 1):]
    return prompt, min(max_new_tokens, window - len(prompt))


@torch.no_grad()
def generate_plain(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                   params: SamplingParams = SamplingParams(), eos_id: int | None = None) -> Iterator[Event]:
    prompt, max_new_tokens = fit_prompt(model, prompt, max_new_tokens)
    device = model.device
    generator = params.generator(device)
    cache = model.new_cache(batch=1, max_len=len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache, n_heads=1, last_only=True)[0][:, -1]  # [1, V]
    for produced in range(1, max_new_tokens + 1):
        token = sample(logits, params, generator)  # [1]
        value = int(token)
        if value == eos_id:
            yield Event([], finished=True)
            return
        yield Event([value], finished=produced == max_new_tokens)
        if produced == max_new_tokens:
            return
        logits = model(token[:, None], cache, n_heads=1)[0][:, -1]


def generate_ids(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), eos_id: int | None = None) -> list[int]:
    return [t for event in generate_plain(model, prompt, max_new_tokens, params, eos_id)
            for t in event.tokens]

