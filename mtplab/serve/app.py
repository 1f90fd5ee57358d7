"""The FastAPI app: OpenAI-compatible completions and chat, the chat page, health and metrics,
OpenAI-style errors (api_errors.py). What a request asks of the model is service.py's; this module
wires routes, error handlers and the ASGI layers around it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.engine import Engine
from ..inference.tree import DraftTree
from .api_errors import RETRY_AFTER_S, APIError, error_response
from .limits import Limits, ReadBody
from .metrics import Metrics
from .schemas import ChatRequest, CompletionRequest
from .service import Service

STATIC = Path(__file__).parent / "static"
ASSETS = frozenset(p.name for p in STATIC.iterdir() if p.is_file())  # what /static/ serves, by name
log = logging.getLogger("mtplab.serve")


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
    service = Service(model, tokenizer, model_name, max_queue, max_batch, decode_fn, engine_fn, limits,
                      tree, speculative)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker()
        yield
        service.stop()

    app = FastAPI(title="mtplab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics = app.state.metrics = Metrics(service.worker)
    app.state.drain = service.drain  # server.py calls it on Ctrl-C / SIGTERM
    app.state.worker = service.worker  # the model worker (tests, /metrics)
    _add_error_handlers(app)
    app.add_middleware(ReadBody, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)  # before the body is read
    app.add_middleware(Guard, metrics=metrics)  # outermost: catches what the handlers let through
    _add_operations(app, service, metrics)
    router = APIRouter()
    _add_pages(router, service)
    _add_completions(router, service)
    app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation, Starlette's 404 and 405."""

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


def _add_operations(app: FastAPI, service: Service, metrics: Metrics) -> None:
    """What operators and load balancers ask: /health (no key needed) and /metrics."""

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        w = service.worker()
        out = {"status": "ok", "model": service.model_name, "running": len(w.active), "waiting": len(w.waiting),
               "finished": w.finished, "cancelled": w.cancelled, "max_batch": w.max_batch}
        if w.unavailable:  # shutting down, or the worker died: a load balancer should look elsewhere
            return JSONResponse({**out, "status": "unavailable", "reason": w.unavailable}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return out

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def prometheus():
        text = metrics.render()
        if text is None:
            raise APIError(404, "metrics need the prometheus_client package: pip install prometheus_client",
                           code="not_found")
        return Response(text, media_type=metrics.content_type)


def _add_pages(router: APIRouter, service: Service) -> None:
    """The model card (/v1/models) and the chat page with its static files."""

    @router.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models():
        return {"object": "list", "data": [service.card]}

    @router.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def get_model(name: str):
        service.check_model(name)
        return service.card

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @router.api_route("/static/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:  # a set lookup: no file-system call on a name we did not ship
            raise APIError(404, f"no static file {name[:100]!r}", code="not_found")
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


def _add_completions(router: APIRouter, service: Service) -> None:
    """OpenAI's /v1/completions and /v1/chat/completions."""

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        prompt = service.completion_prompt(body)
        ids = await asyncio.to_thread(service.tokenizer.encode, prompt) if isinstance(prompt, str) else prompt
        return await service.respond(request, body, ids, body.max_tokens, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_model(body.model)
        ids = await asyncio.to_thread(service.tokenizer.encode, service.chat_prompt(body))
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await service.respond(request, body, ids, limit, chat=True)
