"""The FastAPI app: OpenAI-compatible completions and chat, the chat page, OpenAI-style errors.

Every answer to a bad request is a 4xx whose body is `{"error": {"message", "type", "param",
"code"}}`, as the `openai` client expects; a 5xx would mean a bug in mtplab. Decoding runs on the
model worker's thread (worker.py): a Transformer's requests are rows of one batched engine
(continuous batching, up to `max_batch` rows), another architecture's one at a time in turn. The
handlers only tokenize, validate and relay pieces. Streams
are server-sent events, one chunk per decode event plus a final chunk with `usage`, ending with
`data: [DONE]`. Each chunk carries an `mtplab` object: the event's tokens, which of them were
accepted drafts, the drafts verified and τ (tokens per forward) so far.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..architectures import architecture_of
from ..config import check_think_loops
from ..errors import MtplabError
from ..inference.decode import decode
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams
from ..inference.tree import DraftTree
from ..models.transformer import Transformer
from .limits import Limits, ReadBody
from .metrics import Metrics, Watch
from .schemas import SPECULATION, ChatRequest, CompletionRequest, _Sampling
from .streaming import EngineJob, Piece, stream_pieces
from .worker import QueueFull, Ticket, Unavailable, Worker

STATIC = Path(__file__).parent / "static"
ASSETS = frozenset(p.name for p in STATIC.iterdir() if p.is_file())  # what /static/ serves, by name
log = logging.getLogger("mtplab.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 5  # what a 503 (shutting down, the worker died) asks the client to wait
MIN_TEMPERATURE, MIN_TOP_P = 1e-5, 1e-6  # below: greedy, resp. the top token only (see plan())


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    @classmethod
    def unavailable(cls, reason: str) -> APIError:
        """503: the server is shutting down or its model worker has died; the client may retry."""
        return cls(503, reason, type="server_error", code="unavailable",
                   headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # always encodable
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


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


class Guard:
    """The outermost ASGI layer: `/health/` is `/health` (one trailing slash is dropped); an
    exception that escapes the app is logged and answered with a JSON 500 and `Connection: close`
    (or, once the answer has begun, the connection is closed), so that the next request on a
    keep-alive connection finds a clean one; each answered request is counted and logged
    (metrics.py)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope["path"]) > 1 and scope["path"].endswith("/"):
            scope["path"] = scope["path"][:-1]
        note = scope["mtplab"] = {"arrived": time.perf_counter()}
        status = None

        async def tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_flight = self.metrics.in_flight if self.metrics.registry is not None else None
        if in_flight is not None:
            in_flight.inc()
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 -- a bug in mtplab; the client still gets an answer
            log.exception("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if status is None:
                status = 500
                response = error_response(500, f"internal error: {type(exc).__name__}", type="server_error",
                                          headers={"Connection": "close"})
                await response(scope, receive, send)
        finally:
            if in_flight is not None:
                in_flight.dec()
            watch = note.get("watch")
            self.metrics.answered(scope["method"], scope["path"], status or 499, watch.tokens if watch else 0,
                                  time.perf_counter() - note["arrived"])


class RequireKey:
    """ASGI middleware: every route but /health and the chat page (`/` and `/static/`: they hold
    no data; the page asks for the key) needs `Authorization: Bearer KEY`. Checked before the body
    is read, so a client without the key learns nothing about the API."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in ("/health", "/") and not path.startswith("/static/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_text(text: str, param: str) -> None:
    """A 400 naming `param` for text that has no UTF-8 form (a lone UTF-16 surrogate, as JSON's
    `\\ud800` can write): the tokenizer cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: the text is not valid Unicode: {text[exc.start]!r} at "
                       f"character {exc.start} is a lone surrogate", param=param) from None


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, model_name: str = "mtplab", api_key: str | None = None,
               max_queue: int = 64, max_batch: int = 16, decode_fn: Callable[..., Iterator] | None = None,
               engine_fn: Callable[..., Engine] = Engine, limits: Limits = Limits(),
               tree: DraftTree | None = None, speculative: str = "chain") -> FastAPI:
    """An app serving one model, decoding up to `max_batch` requests together with `max_queue`
    more waiting. A Transformer's requests share one `engine_fn(model, max_batch=, n_draft=, tree=)`
    (tests slow it down to press stop mid-answer). `decode_fn`, with
    `mtplab.inference.decode.decode`'s signature, decodes each request on its own instead, in turn
    (another architecture's model, e.g. Monostep's blocks, always does, with `decode`). `limits`: the
    body size and read deadline, the longest prompt (limits.py; the HTTP layer's own are `limits.uvicorn_config`'s).
    `tree`: the draft tree of requests that speculate with one (default: DraftTree.default for the
    model's heads); `speculative`: how requests that do not choose decode, "tree", "chain" or "off"
    (a model without draft heads decodes plain)."""
    window = model.config.max_seq_len
    max_prompt = min(limits.max_prompt_tokens or window - 1, window - 1)
    vocab = model.config.vocab_size
    other = architecture_of(model)  # e.g. Monostep: one block of slots per forward, no speculation
    batched = decode_fn is None and isinstance(model, Transformer)  # else one request at a time
    depth = model.n_future - 1 if other is None else 0  # draft heads that can speculate
    if speculative not in SPECULATION:
        raise MtplabError(f"speculative must be one of {', '.join(SPECULATION)}, got {speculative!r}")
    if tree is not None and other is not None:
        raise MtplabError(f"a {other.label} model {other.decoding}: it has no tree speculation")
    if tree is not None and tree.depth > depth:
        raise MtplabError(f"the draft tree is {tree.depth} deep; the model has {depth} draft heads")
    if depth and tree is None:
        tree = DraftTree.default(depth)
    default_mode = speculative if depth else "off"
    decode_fn = decode_fn or decode
    created = int(time.time())
    state: dict[str, Worker | None] = {"worker": None}

    def worker() -> Worker:
        if state["worker"] is None:  # made on first use, so that an app without lifespan works too
            def engine(think_loops: int):  # on the worker thread, per count in use: max_batch rows
                default, model.n_think_loops = model.n_think_loops, think_loops
                try:  # the engine's KV cache is laid out for this count and keeps it
                    return engine_fn(model, max_batch=max_batch, n_draft=model.n_future - 1, tree=tree)
                finally:
                    model.n_think_loops = default
            state["worker"] = (Worker(max_queue, max_batch, engine, model.n_think_loops) if batched
                               else Worker(max_queue, max_batch))
        return state["worker"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker()
        yield
        if state["worker"] is not None:
            state["worker"].stop()
            state["worker"] = None

    app = FastAPI(title="mtplab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = app.state.metrics = Metrics(worker)

    # -- errors, all in OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg', '')}")
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        where = f"{param}: " if param else "the request body: "
        return error_response(400, where + str(first.get("msg", "invalid value")), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    app.add_middleware(ReadBody, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)  # before the body is read
    app.add_middleware(Guard, metrics=metrics)  # outermost: catches what the handlers let through
    router = APIRouter()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        w = worker()
        out = {"status": "ok", "model": model_name, "running": len(w.active), "waiting": len(w.waiting),
               "finished": w.finished, "cancelled": w.cancelled, "max_batch": w.max_batch}
        if w.unavailable:  # shutting down, or the worker died: a load balancer should look elsewhere
            return JSONResponse({**out, "status": "unavailable", "reason": w.unavailable}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return out

    def drain(grace: float = 2.0) -> None:
        """Shutting down: new requests get a 503 now; after `grace` seconds the worker stops, and
        what still runs ends (a 503, or an error event in a stream) before the server closes."""
        w = worker()
        w.unavailable = w.unavailable or "the server is shutting down"
        timer = threading.Timer(grace, w.stop)
        timer.daemon = True
        timer.start()
    app.state.drain = drain  # server.py calls it on Ctrl-C / SIGTERM
    app.state.worker = worker  # the model worker (tests, /metrics)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus():
        text = metrics.render()
        if text is None:
            raise APIError(404, "metrics need the prometheus_client package: pip install prometheus_client",
                           code="not_found")
        return Response(text, media_type=metrics.content_type)

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "mtplab",
            "mtplab": {"context_length": window, "heads": model.n_future,
                       "parameters": model.num_parameters(), "chat_template": tokenizer.chat_template,
                       # what a request without `speculative` decodes with, and a "tree" request's tree
                       "speculative": default_mode, "draft_tree": str(tree) if tree is not None else None}}

    @router.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models():
        return {"object": "list", "data": [card]}

    @router.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def get_model(name: str):
        check_model(name)
        return card

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @router.api_route("/static/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:  # a set lookup: no file-system call on a name we did not ship
            raise APIError(404, f"no static file {name[:100]!r}", code="not_found")
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    # -- generation -------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")

    def plan(body: _Sampling, prompt: list[int], max_tokens: int | None) -> tuple[Any, int]:
        """Validate what depends on the model; returns the worker's job (or decoder factory) and
        the limit."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) >= window:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {window} "
                           f"tokens, so at most {window - 1} fit with room for an answer",
                           param="prompt", code="context_length_exceeded")
        if len(prompt) > max_prompt:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this server takes at most {max_prompt}",
                           param="prompt", code="prompt_too_long")
        room = window - len(prompt)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the context ({window} tokens) leaves "
                           f"room for {room} after the {len(prompt)}-token prompt",
                           param="max_tokens", code="context_length_exceeded")
        problem = body.check_stop()
        if problem:
            raise APIError(400, problem, param="stop")
        for i, stop in enumerate(body.stop_strings()):
            check_text(stop, "stop" if isinstance(body.stop, str) else f"stop.{i}")
        mode = speculation(body.speculative, body.n_draft)
        if body.think_loops is not None:  # mtplab extension: this request's think loops
            try:
                check_think_loops(model.config, body.think_loops, f"the model {model_name!r}")
            except MtplabError as exc:
                raise APIError(400, str(exc), param="think_loops") from None
            if not batched and body.think_loops != model.n_think_loops:
                raise APIError(400, f"this server decodes requests one at a time at "
                               f"{model.n_think_loops} think loops", param="think_loops")
        if body.n_draft is not None and body.n_draft > model.n_future - 1:
            raise APIError(400, f"n_draft must be between 0 and {model.n_future - 1} (the model has "
                           f"{model.n_future} heads)", param="n_draft")
        # Below these, fp32 turns logits / temperature into inf and top_p into 0 (NaN probabilities);
        # both already mean "the most likely token", which is what they become.
        temperature = body.temperature or 0.0
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        top_p = 1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P)
        try:
            params = SamplingParams(temperature, body.top_k or 0, top_p, body.seed)
        except MtplabError as exc:
            raise APIError(400, str(exc)) from None
        stops = body.stop_strings()
        n_draft = (depth if body.n_draft is None else body.n_draft) if mode != "off" else 0
        if batched:
            job = EngineJob(tokenizer, prompt, max_tokens, params, n_draft, stops, tree=mode == "tree")
            return job, max_tokens

        def start():
            return stream_pieces(model, tokenizer, prompt, max_tokens, params, mode != "off",
                                 n_draft, stops, decode_fn, tree if mode == "tree" else None)
        return start, max_tokens

    def speculation(value: bool | str | None, n_draft: int | None) -> str:
        """A request's `speculative` as "tree", "chain" or "off" (true: the server's default)."""
        if other is not None and (value not in (None, False, "off") or n_draft):
            raise APIError(400, f"this is a {other.label} model: it {other.decoding} of "
                           f"{model.n_future} tokens, without speculation", param="speculative")
        if isinstance(value, str) and value != "off" and not depth:
            raise APIError(400, f"the model {model_name!r} has one head: nothing to draft a {value} with",
                           param="speculative")
        return default_mode if value is None or value is True else "off" if value is False else value

    def submit(work, think_loops: int | None = None) -> Ticket:
        try:
            return worker().submit_job(work, think_loops) if batched else worker().submit(work)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}", type="rate_limit_error",
                           code="queue_full") from None
        except Unavailable as exc:
            raise APIError.unavailable(str(exc)) from None

    async def respond(request: Request, body: _Sampling, prompt: list[int], max_tokens: int | None,
                      chat: bool):
        work, max_tokens = plan(body, prompt, max_tokens)
        ticket = submit(work, body.think_loops)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
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
                out["mtplab"].update(_summary(piece, body))
            return out

        note = request.scope.setdefault("mtplab", {})  # Guard's: the access log reads the tokens
        watch = note["watch"] = metrics.watch(note.get("arrived", time.perf_counter()))
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
                "choices": [choice], "usage": usage(last), "mtplab": _summary(last, body, pieces)}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt, param = body.prompt, "prompt"
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt, param = prompt[0], "prompt.0"
        if isinstance(prompt, str):
            check_text(prompt, param)
            ids = await asyncio.to_thread(tokenizer.encode, prompt)
        else:
            ids = prompt
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return await respond(request, body, ids, body.max_tokens, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                check_text(m.content, f"messages.{i}.content")
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                check_text(part.text, f"messages.{i}.content.{j}.text")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = tokenizer.render_chat(messages)
        except MtplabError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = await asyncio.to_thread(tokenizer.encode, text)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(request, body, ids, limit, chat=True)

    app.include_router(router)
    return app


def _usage_for(prompt_tokens: int) -> Callable[[Piece], dict]:
    def usage(piece: Piece) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": piece.completion_tokens,
                "total_tokens": prompt_tokens + piece.completion_tokens}
    return usage


def _summary(last: Piece, body: _Sampling, pieces: list[Piece] | None = None) -> dict:
    """The request's speculation figures, sent with the final chunk or answer."""
    out = {"tau": round(last.tau, 4), "tokens_per_s": round(last.tokens_per_s, 2),
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
