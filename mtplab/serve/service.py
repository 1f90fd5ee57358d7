"""One model behind the API: what a request may ask of it, the worker that decodes for it, and the
answer to one completion, streamed or whole.

Decoding runs on the model worker's thread (worker.py): a Transformer's requests are rows of one
batched engine (continuous batching, up to `max_batch` rows), another architecture's one at a time
in turn; the handlers only tokenize, validate and relay pieces. Streams are server-sent events, one
chunk per decode event plus a final chunk with `usage`, ending with `data: [DONE]`. Each chunk
carries an `mtplab` object: the event's tokens, which of them were accepted drafts, the drafts
verified and τ (tokens per forward) so far.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..architectures import architecture_of
from ..config import check_think_loops
from ..errors import MtplabError
from ..inference.decode import decode
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..inference.tree import DraftTree
from ..models.transformer import Transformer
from .api_errors import APIError, check_text, error_body
from .limits import Limits
from .metrics import Metrics, Watch
from .schemas import SPECULATION, ChatRequest, CompletionRequest, _Sampling
from .streaming import EngineJob, Piece, stream_pieces
from .worker import QueueFull, Ticket, Unavailable, Worker

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
MIN_TEMPERATURE, MIN_TOP_P = 1e-5, 1e-6  # below: greedy, resp. the top token only (see Service._sampling)


class Service:
    """One model behind the API: the checks that depend on it, its worker (made on first use, so
    that an app without lifespan works too), and the answer to one completion request.
    `create_app` documents the arguments."""

    def __init__(self, model, tokenizer, model_name: str, max_queue: int, max_batch: int,
                 decode_fn: Callable[..., Iterator] | None, engine_fn: Callable[..., Engine], limits: Limits,
                 tree: DraftTree | None, speculative: str):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_queue, self.max_batch, self.engine_fn = max_queue, max_batch, engine_fn
        self.window = model.config.max_seq_len
        self.max_prompt = min(limits.max_prompt_tokens or self.window - 1, self.window - 1)
        self.other = architecture_of(model)  # e.g. Monostep: one block of slots per forward, no speculation
        self.batched = decode_fn is None and isinstance(model, Transformer)  # else one request at a time
        self.depth = model.n_future - 1 if self.other is None else 0  # draft heads that can speculate
        if speculative not in SPECULATION:
            raise MtplabError(f"speculative must be one of {', '.join(SPECULATION)}, got {speculative!r}")
        if tree is not None and self.other is not None:
            raise MtplabError(f"a {self.other.label} model {self.other.decoding}: it has no tree speculation")
        if tree is not None and tree.depth > self.depth:
            raise MtplabError(f"the draft tree is {tree.depth} deep; the model has {self.depth} draft heads")
        self.tree = DraftTree.default(self.depth) if self.depth and tree is None else tree
        self.default_mode = speculative if self.depth else "off"
        self.decode_fn = decode_fn or decode
        self.metrics: Metrics | None = None  # the app's, set when it is made
        self._worker: Worker | None = None
        self.card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "mtplab",
                     "mtplab": {"context_length": self.window, "heads": model.n_future,
                                "parameters": model.num_parameters(), "chat_template": tokenizer.chat_template,
                                # what a request without `speculative` decodes with, and a "tree" request's tree
                                "speculative": self.default_mode,
                                "draft_tree": str(self.tree) if self.tree is not None else None}}

    # -- the worker --------------------------------------------------------------------------------
    def worker(self) -> Worker:
        if self._worker is None:
            model = self.model

            def engine(think_loops: int):  # on the worker thread, per count in use: max_batch rows
                default, model.n_think_loops = model.n_think_loops, think_loops
                try:  # the engine's KV cache is laid out for this count and keeps it
                    return self.engine_fn(model, max_batch=self.max_batch, n_draft=model.n_future - 1,
                                          tree=self.tree)
                finally:
                    model.n_think_loops = default
            self._worker = (Worker(self.max_queue, self.max_batch, engine, model.n_think_loops) if self.batched
                            else Worker(self.max_queue, self.max_batch))
        return self._worker

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def drain(self, grace: float = 2.0) -> None:
        """Shutting down: new requests get a 503 now; after `grace` seconds the worker stops, and
        what still runs ends (a 503, or an error event in a stream) before the server closes."""
        w = self.worker()
        w.unavailable = w.unavailable or "the server is shutting down"
        timer = threading.Timer(grace, w.stop)
        timer.daemon = True
        timer.start()

    # -- one request ---------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")

    def completion_prompt(self, body: CompletionRequest) -> str | list[int]:
        """A completion's prompt: text to encode, or token ids (checked against the vocabulary)."""
        prompt, param = body.prompt, "prompt"
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt, param = prompt[0], "prompt.0"
        if isinstance(prompt, str):
            check_text(prompt, param)
            return prompt
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return prompt

    def chat_prompt(self, body: ChatRequest) -> str:
        """The conversation rendered with the checkpoint's chat template."""
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                check_text(m.content, f"messages.{i}.content")
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                check_text(part.text, f"messages.{i}.content.{j}.text")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            return self.tokenizer.render_chat(messages)
        except MtplabError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def plan(self, body: _Sampling, prompt: list[int], max_tokens: int | None) -> tuple[Any, int, str]:
        """Validate what depends on the model; returns the worker's job (or decoder factory), the
        limit and the decoder: "tree", "chain" or "off"."""
        max_tokens = self._answer_room(prompt, max_tokens)
        problem = body.check_stop()
        if problem:
            raise APIError(400, problem, param="stop")
        stops = body.stop_strings()
        for i, stop in enumerate(stops):
            check_text(stop, "stop" if isinstance(body.stop, str) else f"stop.{i}")
        mode = self._speculation(body.speculative, body.n_draft)
        self._check_think_loops(body.think_loops)
        model = self.model
        if body.n_draft is not None and body.n_draft > model.n_future - 1:
            raise APIError(400, f"n_draft must be between 0 and {model.n_future - 1} (the model has "
                           f"{model.n_future} heads)", param="n_draft")
        params = self._sampling(body)
        n_draft = (self.depth if body.n_draft is None else body.n_draft) if mode != "off" else 0
        if self.batched:
            job = EngineJob(self.tokenizer, prompt, max_tokens, params, n_draft, stops, tree=mode == "tree")
            return job, max_tokens, mode

        def start():
            return stream_pieces(model, self.tokenizer, prompt, max_tokens, params, mode != "off",
                                 n_draft, stops, self.decode_fn, self.tree if mode == "tree" else None)
        return start, max_tokens, mode

    def _answer_room(self, prompt: list[int], max_tokens: int | None) -> int:
        """The answer's token limit: max_tokens, or all the context the prompt leaves."""
        window = self.window
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) >= window:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {window} "
                           f"tokens, so at most {window - 1} fit with room for an answer",
                           param="prompt", code="context_length_exceeded")
        if len(prompt) > self.max_prompt:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this server takes at most "
                           f"{self.max_prompt}", param="prompt", code="prompt_too_long")
        room = window - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the context ({window} tokens) leaves "
                           f"room for {room} after the {len(prompt)}-token prompt",
                           param="max_tokens", code="context_length_exceeded")
        return room if max_tokens is None else max_tokens

    def _speculation(self, value: bool | str | None, n_draft: int | None) -> str:
        """A request's `speculative` as "tree", "chain" or "off" (true: the server's default)."""
        other = self.other
        if other is not None and (value not in (None, False, "off") or n_draft):
            raise APIError(400, f"this is a {other.label} model: it {other.decoding} of "
                           f"{self.model.n_future} tokens, without speculation", param="speculative")
        if isinstance(value, str) and value != "off" and not self.depth:
            raise APIError(400, f"the model {self.model_name!r} has one head: nothing to draft a {value} with",
                           param="speculative")
        return self.default_mode if value is None or value is True else "off" if value is False else value

    def _check_think_loops(self, think_loops: int | None) -> None:
        """mtplab's extension: a request's own think loops (a looped trunk)."""
        if think_loops is None:
            return
        try:
            check_think_loops(self.model.config, think_loops, f"the model {self.model_name!r}")
        except MtplabError as exc:
            raise APIError(400, str(exc), param="think_loops") from None
        if not self.batched and think_loops != self.model.n_think_loops:
            raise APIError(400, f"this server decodes requests one at a time at "
                           f"{self.model.n_think_loops} think loops", param="think_loops")

    @staticmethod
    def _sampling(body: _Sampling) -> SamplingParams:
        # Below these, fp32 turns logits / temperature into inf and top_p into 0 (NaN probabilities);
        # both already mean "the most likely token", which is what they become.
        temperature = body.temperature or 0.0
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        top_p = 1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P)
        try:
            return SamplingParams(temperature, body.top_k or 0, top_p, body.seed)
        except MtplabError as exc:
            raise APIError(400, str(exc)) from None

    def submit(self, work, think_loops: int | None = None) -> Ticket:
        try:
            return self.worker().submit_job(work, think_loops) if self.batched else self.worker().submit(work)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}", type="rate_limit_error",
                           code="queue_full") from None
        except Unavailable as exc:
            raise APIError.unavailable(str(exc)) from None

    async def respond(self, request: Request, body: _Sampling, prompt: list[int], max_tokens: int | None,
                      chat: bool):
        """Decode one request: a stream of chunks, or the whole answer once it is done."""
        work, max_tokens, mode = self.plan(body, prompt, max_tokens)
        ticket = self.submit(work, body.think_loops)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        usage = _usage_for(len(prompt))

        def chunk(piece: Piece) -> dict:
            choice = {"index": 0, "logprobs": None, "finish_reason": piece.finish_reason}
            if chat:
                choice["delta"] = {"content": piece.text} if piece.text or not piece.finish_reason else {}
            else:
                choice["text"] = piece.text
            out = {**head, "choices": [choice], "mtplab": piece.extension()}
            if piece.finish_reason:
                out["usage"] = usage(piece)
                out["mtplab"].update(_summary(piece, mode))
            return out

        note = request.scope.setdefault("mtplab", {})  # Guard's: the access log reads the tokens
        watch = note["watch"] = self.metrics.watch(note.get("arrived", time.perf_counter()))
        if body.stream:
            def closed():
                ticket.cancel()
                watch.end()
            return EventStream(_events(ticket, chunk, chat, head, watch), on_close=closed)
        try:
            pieces = await _collect(request, ticket, watch)
        finally:
            watch.end()
        if pieces is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        text = "".join(p.text for p in pieces)
        last = pieces[-1]
        choice = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice], "usage": usage(last), "mtplab": _summary(last, mode, pieces)}


class EventStream(StreamingResponse):
    """SSE response that cancels its generation however the stream ends (done, error, disconnect)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage_for(prompt_tokens: int) -> Callable[[Piece], dict]:
    def usage(piece: Piece) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": piece.completion_tokens,
                "total_tokens": prompt_tokens + piece.completion_tokens}
    return usage


def _summary(last: Piece, mode: str, pieces: list[Piece] | None = None) -> dict:
    """The request's speculation figures, sent with the final chunk or answer; `speculative` says
    which decoder it got ("tree", "chain" or "off"), whatever it asked."""
    out = {"speculative": mode, "tau": round(last.tau, 4), "tokens_per_s": round(last.tokens_per_s, 2),
           "acceptance_by_position": [round(a, 4) for a in last.stats.acceptance_by_position]}
    if pieces is not None:
        out["accepted"] = [a for p in pieces for a in p.accepted]
        out["accepted_tokens"] = sum(out["accepted"])
    return out


async def _events(ticket: Ticket, chunk: Callable[[Piece], dict], chat: bool, head: dict, watch: Watch):
    if chat:  # as OpenAI: the first chunk opens the assistant's message
        yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    try:
        while True:
            item = await ticket.get()
            if item is Ticket.END:
                break
            watch.saw(item)
            yield sse(chunk(item))
            if item.finish_reason:
                ticket.completed = True
                break
    except MtplabError as exc:
        yield sse(error_body(str(exc)))
    # a bug (the worker logged it); the response has begun, so the stream itself must say so
    except Exception as exc:  # noqa: BLE001
        yield sse(error_body(f"internal error: {type(exc).__name__}", type="server_error"))
    yield "data: [DONE]\n\n"


async def _collect(request: Request, ticket: Ticket, watch: Watch) -> list[Piece] | None:
    """All pieces of a non-streaming answer; None if the client disconnects first."""
    pieces: list[Piece] = []
    loop = asyncio.get_running_loop()
    check_at = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            get = asyncio.ensure_future(ticket.get())
            while True:  # pieces may come faster than the poll: check on the clock, not on silence
                done, _ = await asyncio.wait({get}, timeout=max(0.0, check_at - loop.time()))
                if loop.time() >= check_at:
                    check_at = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        get.cancel()
                        return None
                if done:
                    break
            try:
                item = get.result()
            except Unavailable as exc:
                raise APIError.unavailable(str(exc)) from None
            except MtplabError as exc:
                raise APIError(400, str(exc)) from None
            if item is Ticket.END:
                return pieces
            watch.saw(item)
            pieces.append(item)
            if item.finish_reason:
                ticket.completed = True
                return pieces
    finally:
        ticket.cancel()
