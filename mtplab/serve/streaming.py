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
from ..inference.sampling import SamplingParams
from ..inference.speculative import SpeculativeStats

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


def stream_pieces(model, tokenizer, prompt: list[int], max_tokens: int, params: SamplingParams,
                  speculative: bool | None = None, n_draft: int | None = None, stop: list[str] = (),
                  decode_fn: Callable[..., Iterator] = decode) -> Iterator[Piece]:
    """The pieces of one completion; the last has `finish_reason` set."""
    stats = SpeculativeStats()
    text = TextDecoder(tokenizer)
    stops = StopStrings(list(stop))
    forwards = produced = 0
    t0 = time.perf_counter()
    events = decode_fn(model, prompt, max_tokens, params, tokenizer.eos_id, speculative, n_draft, stats)
    for event in events:
        forwards += 1  # each event is one trunk forward (the first one reads the prompt)
        produced += len(event.tokens)
        segments = [(text.feed([t]), a) for t, a in zip(event.tokens, event.accepted)]
        if event.finished:
            segments.append((text.flush(), False))
        out, stopped = stops.push(segments)
        finish = None
        if stopped:
            finish = "stop"
        elif event.finished:
            out += stops.flush()
            finish = "length" if produced >= max_tokens else "stop"  # else eos came first
        elapsed = time.perf_counter() - t0
        yield Piece("".join(t for t, _ in out), out, list(event.tokens), list(event.accepted),
                    list(event.drafts), produced / forwards, produced / max(elapsed, 1e-9), produced,
                    finish, stats)
        if finish:
            return
    # a decoder that ends without a finished event still gets its held-back text out
    out, stopped = stops.push([(text.flush(), False)])
    if not stopped:
        out += stops.flush()
    yield Piece("".join(t for t, _ in out), out, [], [], [], produced / max(forwards, 1),
                produced / max(time.perf_counter() - t0, 1e-9), produced,
                "length" if produced >= max_tokens else "stop", stats)
