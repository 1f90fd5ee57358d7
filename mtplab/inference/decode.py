"""Text in, text out: picks plain or speculative decoding and detokenizes the event stream.

Speculation is on by default when the model has heads beyond the next-token head; it never changes
the output (see speculative.py), only how many tokens each forward pass yields. A Monostep model
(seed 000) always decodes in blocks (see blocks.py).
"""

from __future__ import annotations

from typing import Iterator

from ..errors import MtplabError
from ..models.monostep import Monostep
from ..models.transformer import Transformer
from .blocks import generate_blocks
from .generate import Event, generate_plain
from .sampling import SamplingParams
from .speculative import SpeculativeStats, generate_speculative


def decode(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
           params: SamplingParams = SamplingParams(), eos_id: int | None = None,
           speculative: bool | None = None, n_draft: int | None = None,
           stats: SpeculativeStats | None = None) -> Iterator[Event]:
    if isinstance(model, Monostep):
        if speculative:
            raise MtplabError("a Monostep model decodes in blocks: it has no speculative decoding")
        return generate_blocks(model, prompt, max_new_tokens, params, eos_id)
    if speculative is None:
        speculative = model.n_future > 1
    if speculative:
        return generate_speculative(model, prompt, max_new_tokens, params, eos_id, n_draft, stats=stats)
    return generate_plain(model, prompt, max_new_tokens, params, eos_id)


class TextDecoder:
    """Incremental detokenization: feed ids, get the new text; waits while a character is split."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def feed(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence; wait for the next token
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def stream(model: Transformer, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 128,
           params: SamplingParams = SamplingParams(), speculative: bool | None = None,
           n_draft: int | None = None, stats: SpeculativeStats | None = None) -> Iterator[tuple[str, Event]]:
    """(new text, event) pairs for a text prompt; `chat` wraps it in the tokenizer's template."""
    text = tokenizer.chat_prompt(prompt) if chat else prompt
    decoder = TextDecoder(tokenizer)
    for event in decode(model, tokenizer.encode(text), max_new_tokens, params, tokenizer.eos_id,
                        speculative, n_draft, stats):
        yield decoder.feed(event.tokens), event


def generate(model: Transformer, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             speculative: bool | None = None, n_draft: int | None = None) -> str:
    """The completion of `prompt` as text (greedy unless a temperature is given)."""
    params = SamplingParams(temperature, top_k, top_p, seed)
    return "".join(delta for delta, _ in stream(model, tokenizer, prompt, chat, max_new_tokens, params,
                                                speculative, n_draft))
