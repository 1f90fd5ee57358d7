"""Run the app with uvicorn on a socket we bind ourselves, so that a port in use or a bad host is
one clear error before the model loads, not a log line from inside uvicorn. uvicorn enforces the
HTTP layer's limits (limits.py); on Ctrl-C / SIGTERM new requests get a 503 at once and those still
running end within GRACE_S seconds."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from ..errors import MtplabError
from .limits import Limits


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise MtplabError(f"port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise MtplabError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets linger
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is in use" if exc.errno in (98, 48) else f"cannot be bound: {exc.strerror}"
        raise MtplabError(f"port {port} on {host} {reason}") from None
    sock.listen(2048)
    return sock


GRACE_S = 3  # seconds that running requests have to end once the server is told to stop


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_queue: int = 64, max_batch: int | None = None,
          device: str = "cpu", log_level: str = "info",
          limits: Limits = Limits(), think_loops: int | None = None, kv_memory_mib: int = 1024,
          tree: str | None = None) -> None:
    """`max_batch` None: as many rows as fit `kv_memory_mib` of KV cache, at most 64. `tree`: a
    `--tree` value (calibrate.tree_option): requests that do not choose verify that tree; without
    one they draft a chain, and a request that asks for "tree" verifies the 'auto' tree."""
    import uvicorn

    from ..architectures import architecture_of
    from ..config import check_think_loops
    from ..inference.calibrate import tree_option
    from ..models.checkpoint import load_model
    from .app import create_app
    from .limits import uvicorn_config

    if max_batch is not None and max_batch < 1:
        raise MtplabError(f"--max-batch must be >= 1, got {max_batch}")
    if kv_memory_mib < 1:
        raise MtplabError(f"--kv-memory must be >= 1 MiB, got {kv_memory_mib}")
    if max_queue < 0:
        raise MtplabError(f"--max-queue must be >= 0, got {max_queue}")
    if api_key is not None and not api_key.strip():
        raise MtplabError("--api-key must not be empty")
    sock = bind(host, port)
    try:
        model, tokenizer = load_model(checkpoint, device)
        if think_loops is not None:  # the default of requests that set no think_loops of their own
            check_think_loops(model.config, think_loops, checkpoint)
            model.n_think_loops = think_loops
        name = model_name or Path(checkpoint).resolve().name
        other = architecture_of(model)
        if tree is not None and other is not None:
            raise MtplabError(f"--tree: {checkpoint} is a {other.label} model: it {other.decoding}, "
                              "without speculation")
        can_draft = other is None and model.n_future > 1
        draft = tree_option(tree or "auto", model, checkpoint) if tree is not None or can_draft else None
        if max_batch is None:
            from ..inference.engine import rows_that_fit

            # a row's cache holds the drafted positions past its end too: the tree's, or the chain's
            room = max(model.n_future - 1, draft.size if draft is not None else 0)
            max_batch = rows_that_fit(model, room, kv_memory_mib << 20)
        app = create_app(model, tokenizer, name, api_key, max_queue, max_batch, limits=limits, tree=draft,
                         speculative="tree" if tree is not None else "chain")
        shown = f"[{host}]" if ":" in host else host
        print(f"mtplab serve: model {name!r} ({model.num_parameters() / 1e6:.1f}M parameters, "
            f"{model.n_future} head(s), up to {max_batch} requests decoded together"
            f"{f', verifying a {draft.size}-node draft tree by default' if tree is not None else ''}) at "
            f"http://{shown}:{sock.getsockname()[1]}/ "
            f"(chat page at /, OpenAI API at /v1){'; API key required' if api_key else ''}", flush=True)
        log_to_stderr(log_level)

        class Draining(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                app.state.drain(GRACE_S - 1)  # the worker stops a second before uvicorn gives up
                super().handle_exit(sig, frame)

        server = Draining(uvicorn_config(app, limits, log_level=log_level, timeout_graceful_shutdown=GRACE_S,
                                         access_log=False))  # ours (metrics.py) says more
        server.run(sockets=[sock])
        if server.started:  # uvicorn took the Ctrl-C/SIGTERM itself; end like every stopped command
            raise KeyboardInterrupt
    finally:
        sock.close()


def log_to_stderr(level: str) -> None:
    """The server's own log lines (one per request, the worker's errors) to stderr, as uvicorn's."""
    logger = logging.getLogger("mtplab.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
