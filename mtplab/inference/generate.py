"""One prompt at a time, as a stream of events: plain decoding (head 0 only) and lossless
speculative decoding with the model's own heads, both one row of the batched engine (engine.py).

An event carries the tokens one model forward produced: one computed token for plain decoding,
accepted drafts and the computed token after them for speculative decoding, so every consumer
(CLI, server, chat page) handles both the same way.
"""

from __future__ import annotations

from typing import Iterator

from ..errors import MtplabError
from ..models.transformer import Transformer
from .engine import Engine, Event, Request, fit_prompt  # noqa: F401  (Event, fit_prompt: re-exported)
from .sampling import SamplingParams
from .speculative import Randomness, SpeculativeStats
from .tree import DraftTree


def generate_plain(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                   params: SamplingParams = SamplingParams(), eos_id: int | None = None) -> Iterator[Event]:
    fit_prompt(model, prompt, max_new_tokens)  # bad input fails here, before the engine exists
    engine = Engine(model, max_batch=1)
    return engine.stream(engine.submit(Request(prompt, max_new_tokens, params, eos_id)))


def generate_speculative(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                         params: SamplingParams = SamplingParams(), eos_id: int | None = None,
                         n_draft: int | None = None, chance: Randomness | None = None,
                         stats: SpeculativeStats | None = None,
                         tree: DraftTree | None = None) -> Iterator[Event]:
    """Decode with drafts from heads 1..n_draft, verified by head 0 (a chain, or `tree`'s nodes
    cut to n_draft deep). Yields one event per forward."""
    most = model.n_future - 1
    n_draft = most if n_draft is None else n_draft
    if not 0 <= n_draft <= most:
        raise MtplabError(f"n_draft must be between 0 and {most} (the model has {model.n_future} heads)")
    fit_prompt(model, prompt, max_new_tokens)
    engine = Engine(model, max_batch=1, n_draft=n_draft, tree=tree)
    return engine.stream(engine.submit(Request(prompt, max_new_tokens, params, eos_id, n_draft, chance, stats)))


def generate_ids(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), eos_id: int | None = None) -> list[int]:
    return [t for event in generate_plain(model, prompt, max_new_tokens, params, eos_id)
            for t in event.tokens]
