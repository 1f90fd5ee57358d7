"""Text in, text out: picks plain or speculative decoding and detokenizes the event stream.

Speculation is on by default when the model has heads beyond the next-token head; it never changes
the output (see speculative.py), only how many tokens each forward pass yields. Another
architecture (architectures.py, e.g. Monostep's blocks) decodes with its own decoder, unspeculated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..architectures import architecture_of
from ..errors import MtplabError
from ..models.transformer import Transformer
from .engine import Engine, Request, Row
from .generate import Event, generate_plain, generate_speculative
from .sampling import SamplingParams
from .speculative import SpeculativeStats
from .tree import DraftTree


def decode(model: Transformer, prompt: list[int], max_new_tokens: int = 128,
           params: SamplingParams = SamplingParams(), eos_id: int | None = None,
           speculative: bool | None = None, n_draft: int | None = None,
           stats: SpeculativeStats | None = None, tree: DraftTree | None = None) -> Iterator[Event]:
    other = architecture_of(model)
    if other is not None:
        if speculative:
            raise MtplabError(f"a {other.label} model {other.decoding}: it has no speculative decoding")
        return other.decode(model, prompt, max_new_tokens, params, eos_id)
    if speculative is None:
        speculative = model.n_future > 1
    if speculative:
        return generate_speculative(model, prompt, max_new_tokens, params, eos_id, n_draft, stats=stats,
                                    tree=tree)
    return generate_plain(model, prompt, max_new_tokens, params, eos_id)


class TextDecoder:
    """Incremental detokenization: feed ids, get the new text. Trailing replacement characters (a
    UTF-8 sequence split across tokens, or bytes that never form one) are held back until more text
    follows or `flush` ends the stream, so that the pieces join to exactly the full decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def feed(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        stable = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        delta, self.text = stable[len(self.text):], stable
        return delta

    def flush(self) -> str:
        """What is still held back (the end of the stream: nothing more will complete it)."""
        text = self.tokenizer.decode(self.ids)
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
    rest = decoder.flush()
    if rest:
        yield rest, Event([], finished=True)


def generate(model: Transformer, tokenizer, prompt: str, chat: bool = False, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             speculative: bool | None = None, n_draft: int | None = None) -> str:
    """The completion of `prompt` as text (greedy unless a temperature is given)."""
    params = SamplingParams(temperature, top_k, top_p, seed)
    return "".join(delta for delta, _ in stream(model, tokenizer, prompt, chat, max_new_tokens, params,
                                                speculative, n_draft))


@dataclass
class Completion:
    """One prompt's result from `decode_batch` / `decode_many`."""

    index: int  # the prompt's position in the input
    prompt_ids: list[int]
    ids: list[int]  # the new tokens (eos not included)
    stats: SpeculativeStats  # decoding forwards (the prompt's apart) and tokens of this prompt alone
    text: str | None = None  # the new tokens as text (when a tokenizer was given)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def tau(self) -> float:
        """Tokens per decoding forward: 1 for plain decoding, more when drafts pass."""
        return self.stats.tokens_per_forward


def decode_batch(model: Transformer, prompts: Sequence[list[int]], max_new_tokens: int = 128,
                 params: SamplingParams = SamplingParams(), eos_id: int | None = None,
                 batch_size: int = 16, speculative: bool | None = None, n_draft: int | None = None,
                 tokenizer=None, progress: bool = False, desc: str = "decoding",
                 tree: DraftTree | None = None) -> Iterator[Completion]:
    """Decode many token-id prompts, up to `batch_size` rows at a time in one engine; yields the
    completions in input order. Each row decodes exactly as it would alone (greedy: the same
    tokens; sampling with a seed: the same draws, every prompt from its own generator seeded the
    same way). Another architecture (architectures.py) decodes its prompts one after another, with
    its own decoder (Monostep's blocks are batch 1)."""
    if batch_size < 1:
        raise MtplabError(f"batch size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise MtplabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise MtplabError(f"prompt {i + 1} is empty")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        if architecture_of(model) is not None:
            for i, p in enumerate(prompts):
                stats, decoder, ids = SpeculativeStats(), TextDecoder(tokenizer) if tokenizer else None, []
                for event in decode(model, p, max_new_tokens, params, eos_id, speculative, n_draft):
                    stats.forwards += 1  # one event per forward (a Monostep block reads the whole context)
                    stats.tokens += len(event.tokens)
                    stats.decoded += len(event.tokens)
                    ids += event.tokens
                    if decoder:
                        decoder.feed(event.tokens)
                bar.update()
                yield Completion(i, p, ids, stats, _finish(decoder))
            return
        yield from _engine_batches(model, prompts, max_new_tokens, params, eos_id, batch_size,
                                   speculative, n_draft, tokenizer, bar, tree)
    finally:
        bar.close()


def _engine_batches(model, prompts, max_new_tokens, params, eos_id, batch_size, speculative, n_draft,
                    tokenizer, bar, tree=None) -> Iterator[Completion]:
    if speculative is None:
        speculative = model.n_future > 1
    most = model.n_future - 1
    n_draft = (most if n_draft is None else n_draft) if speculative else 0
    # the cache is allocated for max_batch rows: no more than there are prompts
    engine = Engine(model, max_batch=max(1, min(batch_size, len(prompts))), n_draft=n_draft,
                    tree=tree if n_draft else None)
    rows: dict[int, tuple[int, Row, TextDecoder | None, list[int]]] = {}  # id(row) -> ...
    done: dict[int, Completion] = {}
    submitted = emitted = 0
    while emitted < len(prompts):
        # keep the engine's free rows supplied, no more (a row's state is made when it is submitted)
        active = sum(not r.done for r in engine.rows) + len(engine.waiting)
        while submitted < len(prompts) and active < batch_size:
            row = engine.submit(Request(prompts[submitted], max_new_tokens, params, eos_id, n_draft))
            rows[id(row)] = (submitted, row, TextDecoder(tokenizer) if tokenizer else None, [])
            submitted, active = submitted + 1, active + 1
        for row, event in engine.step():
            index, _, decoder, ids = rows[id(row)]
            ids += event.tokens
            if decoder:
                decoder.feed(event.tokens)
            if row.done:
                del rows[id(row)]
                done[index] = Completion(index, prompts[index], ids, row.stats, _finish(decoder))
                bar.update()
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1


def _finish(decoder: TextDecoder | None) -> str | None:
    if decoder is None:
        return None
    decoder.flush()
    return decoder.text


def decode_many(model: Transformer, tokenizer, prompts: Sequence[str | list[int]], chat: bool = False,
                max_new_tokens: int = 128, params: SamplingParams = SamplingParams(),
                batch_size: int = 16, speculative: bool | None = None, n_draft: int | None = None,
                progress: bool = False, desc: str = "decoding") -> Iterator[Completion]:
    """Text (or token-id) prompts decoded `batch_size` at a time; completions, with their text, in
    input order. `chat` wraps text prompts in the tokenizer's template. Each text equals what
    `generate` gives for that prompt alone."""
    ids = [p if not isinstance(p, str) else tokenizer.encode(tokenizer.chat_prompt(p) if chat else p)
           for p in prompts]
    return decode_batch(model, ids, max_new_tokens, params, tokenizer.eos_id, batch_size, speculative,
                        n_draft, tokenizer, progress, desc)
