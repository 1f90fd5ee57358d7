"""Real servers on free loopback ports (uvicorn in a thread) around the tiny checkpoint."""

import threading
import time

import httpx
import pytest
import uvicorn

import mtplab
from mtplab.inference.decode import decode
from mtplab.serve import create_app
from mtplab.serve.server import bind


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_idle(self, timeout: float = 10) -> dict:
        """/health once nothing runs or waits (what a cancelled request should lead to, quickly)."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["running"] == 0 and health["waiting"] == 0:
                return health
            assert time.monotonic() < deadline, health
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class SlowDecode:
    """`decode` that ignores end-of-text and pauses after each event: answers that last long enough
    to be stopped. Records how many events each generation produced and whether it was closed."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.runs: list[dict] = []

    def __call__(self, model, prompt, max_new_tokens, params, eos_id, speculative, n_draft, stats):
        run = {"events": 0, "closed": False, "max": max_new_tokens}
        self.runs.append(run)
        try:
            for event in decode(model, prompt, max_new_tokens, params, None, speculative, n_draft, stats):
                run["events"] += 1
                yield event
                time.sleep(self.delay)
        except GeneratorExit:
            run["closed"] = True
            raise


@pytest.fixture
def slow_decode():
    return SlowDecode


@pytest.fixture(scope="session")
def tiny(tiny_run):
    """(model, tokenizer, checkpoint directory)."""
    model, tokenizer = mtplab.load(tiny_run[0])
    return model, tokenizer, tiny_run[0]


@pytest.fixture(scope="session")
def live(tiny):
    server = LiveServer(create_app(tiny[0], tiny[1], model_name="tiny"))
    yield server
    server.close()


@pytest.fixture
def serve_app(tiny):
    """Start extra servers with their own options: serve_app(**create_app options) -> LiveServer."""
    servers = []

    def start(**options):
        servers.append(LiveServer(create_app(tiny[0], tiny[1], model_name="tiny", **options)))
        return servers[-1]
    yield start
    for server in servers:
        server.close()
