"""Decode events -> what one streamed chunk says: new text, which of it was drafted, τ so far.

Each event (one forward: a computed token plus any accepted drafts) becomes one piece, so a block of
tokens reaches the client as one chunk. The text is split into per-token segments tagged "accepted
draft" or "computed" for the chat page to mark. Stop strings are cut here: text that could be the
start of a stop string is held back until it is known not to be one, so a client never sees part
of a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..inference.decode import TextDecoder, decode
from ..inference.engine import Request
from ..inference.sampling import SamplingParams
from ..inference.speculative import SpeculativeStats
from ..inference.tree import DraftTree

Segment = tuple[str, bool]  # (text, is an accepted draft token)


@dataclass
class Piece:
    text: str  # new text for the client
    segments: list[Segment]  # `text` split by the token that produced it
    tokens: list[int]  # this forward's new token ids (before any stop-string cut)
    accepted: list[bool]  # per token: an accepted draft, else computed by head 0
    drafts: list[int]  # the draft tokens this forward verified
    tau: float  # tokens per forward so far
    tokens_per_s: float
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length" on the last piece
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)

    def extension(self) -> dict:
        """The `mtplab` object sent with each streamed chunk."""
        return {"tokens": self.tokens, "accepted": self.accepted, "drafts": self.drafts,
                "segments": [{"text": t, "accepted": a} for t, a in self.segments],
                "tau": round(self.tau, 4), "tokens_per_s": round(self.tokens_per_s, 2)}


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending: list[Segment] = []

    def push(self, segments: list[Segment]) -> tuple[list[Segment], bool]:
        """Returns (segments safe to send, whether a stop string was found)."""
        self.pending.extend(s for s in segments if s[0])
        text = "".join(t for t, _ in self.pending)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold), False

    def flush(self) -> list[Segment]:
        out, self.pending = self.pending, []
        return out

    def _take(self, n: int) -> list[Segment]:
        out = []
        while n > 0 and self.pending:
            text, flag = self.pending[0]
            if len(text) <= n:
                out.append(self.pending.pop(0))
                n -= len(text)
            else:
                out.append((text[:n], flag))
                self.pending[0] = (text[n:], flag)
                n = 0
        return out


class PieceMaker:
    """One completion's events -> its pieces, one piece per event; the last has `finish_reason`
    set (eos, the token limit or a stop string: the caller stops decoding there)."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str] = (),
                 stats: SpeculativeStats | None = None):
        self.max_tokens = max_tokens
        self.stats = stats if stats is not None else SpeculativeStats()
        self.text = TextDecoder(tokenizer)
        self.stops = StopStrings(list(stop))
        self.forwards = self.produced = 0
        self.t0 = time.perf_counter()

    def _speed(self) -> float:
        return self.produced / max(time.perf_counter() - self.t0, 1e-9)

    def feed(self, event) -> Piece:
        self.forwards += 1  # each event is one trunk forward (the first one reads the prompt)
        self.produced += len(event.tokens)
        segments = [(self.text.feed([t]), a) for t, a in zip(event.tokens, event.accepted)]
        if event.finished:
            segments.append((self.text.flush(), False))
        out, stopped = self.stops.push(segments)
        finish = None
        if stopped:
            finish = "stop"
        elif event.finished:
            out += self.stops.flush()
            finish = "length" if self.produced >= self.max_tokens else "stop"  # else eos came first
        return Piece("".join(t for t, _ in out), out, list(event.tokens), list(event.accepted),
                     list(event.drafts), self.produced / self.forwards, self._speed(), self.produced,
                     finish, self.stats)

    def end(self) -> Piece:
        """The last piece of a decoder that ended without a finished event: the held-back text."""
        out, stopped = self.stops.push([(self.text.flush(), False)])
        if not stopped:
            out += self.stops.flush()
        return Piece("".join(t for t, _ in out), out, [], [], [], self.produced / max(self.forwards, 1),
                     self._speed(), self.produced, "length" if self.produced >= self.max_tokens else "stop",
                     self.stats)


def stream_pieces(model, tokenizer, prompt: list[int], max_tokens: int, params: SamplingParams,
                  speculative: bool | None = None, n_draft: int | None = None, stop: list[str] = (),
                  decode_fn: Callable[..., Iterator] = decode,
                  tree: DraftTree | None = None) -> Iterator[Piece]:
    """The pieces of one completion decoded on its own (`decode_fn`, verifying `tree` when given);
    the last has `finish_reason` set."""
    pieces = PieceMaker(tokenizer, max_tokens, stop)
    for event in decode_fn(model, prompt, max_tokens, params, tokenizer.eos_id, speculative, n_draft,
                           pieces.stats, tree):
        piece = pieces.feed(event)
        yield piece
        if piece.finish_reason:
            return
    yield pieces.end()


class EngineJob:
    """One completion decoded in the worker's batched engine: its engine request (made when the
    worker admits it, so that tokens/s counts from there) and its events -> pieces."""

    def __init__(self, tokenizer, prompt: list[int], max_tokens: int, params: SamplingParams,
                 n_draft: int = 0, stop: list[str] = (), tree: bool = True):
        """`tree`: verify the engine's draft tree (when it has one), else a chain."""
        self.tokenizer, self.prompt, self.max_tokens = tokenizer, prompt, max_tokens
        self.params, self.n_draft, self.stop, self.tree = params, n_draft, list(stop), tree
        self.pieces: PieceMaker | None = None

    def request(self) -> Request:
        self.pieces = PieceMaker(self.tokenizer, self.max_tokens, self.stop)
        return Request(self.prompt, self.max_tokens, self.params, self.tokenizer.eos_id, self.n_draft,
                       stats=self.pieces.stats, tree=self.tree)

    def feed(self, event) -> tuple[Piece, bool]:
        """The event's piece, and whether it is the last (the request leaves the batch)."""
        piece = self.pieces.feed(event)
        return piece, piece.finish_reason is not None
