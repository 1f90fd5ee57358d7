"""Block-autoregressive decoding of a Monostep model: one forward yields SLOTS tokens.

The published model's rules: the slots are decoded independently (argmax each, or sampled each), `<empty>`
tokens are dropped, the rest of the block is appended to the context, which keeps its last
max_len tokens; decoding ends after an empty block or a block holding eos, or after
max_new_tokens // SLOTS blocks. As in the original, tokens a block holds after its eos still count
(eos itself is never emitted). Unlike the original, a prompt longer than max_len is cut too, and a
limit that SLOTS does not divide gets one more block, cut to the limit.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import MtplabError
from ..inference.generate import Event
from ..inference.sampling import SamplingParams, sample
from .model import Monostep


@torch.no_grad()
def generate_blocks(model: Monostep, prompt: list[int], max_new_tokens: int = 128,
                    params: SamplingParams = SamplingParams(), eos_id: int | None = None) -> Iterator[Event]:
    if not prompt:
        raise MtplabError("the prompt is empty")
    if max_new_tokens < 1:
        raise MtplabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    window, empty = model.config.max_seq_len, model.config.empty_token
    generator = params.generator(model.device)
    ids = torch.tensor([prompt[-window:]], device=model.device)
    n_blocks, produced = -(-max_new_tokens // model.n_future), 0
    for b in range(n_blocks):
        logits = model(ids)[0]  # [SLOTS, V]
        block = [t for t in sample(logits, params, generator).tolist() if t != empty]
        if not block:
            yield Event([], finished=True)
            return
        tokens = [t for t in block if t != eos_id][:max_new_tokens - produced]
        produced += len(tokens)
        done = eos_id in block or b == n_blocks - 1 or produced >= max_new_tokens
        yield Event(tokens, finished=done)
        if done:
            return
        ids = torch.cat([ids, torch.tensor([block], device=ids.device)], dim=1)[:, -window:]
