"""Real servers on free loopback ports (uvicorn in a thread) around the tiny checkpoint."""

import dataclasses
import threading
import time

import httpx
import pytest
import uvicorn

import mtplab
from mtplab.inference.engine import Engine
from mtplab.serve import create_app
from mtplab.serve.limits import Limits, uvicorn_config
from mtplab.serve.server import bind


class LiveServer:
    """`app` under uvicorn as `mtplab serve` runs it, with the HTTP layer's `limits`."""

    def __init__(self, app, limits: Limits = Limits()):
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning"))
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


def client(server, key="unused", **kw):
    """The official `openai` client pointed at `server`, without retries."""
    import openai  # only the tests that talk through it need it installed

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def sse_chunks(server, path, body, headers=None):
    """Raw `data:` payloads of a streamed answer, [DONE] included."""
    with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


class Run:
    """One request as the engine saw it: its row, how many events it produced, whether it was
    cancelled (the client left or a stop string) rather than finished."""

    def __init__(self, row):
        self.row, self.events, self.max = row, 0, row.limit

    @property
    def closed(self) -> bool:
        return self.row.cancelled


class RecordingEngine(Engine):
    def __init__(self, model, max_batch, n_draft, owner, tree=None):
        super().__init__(model, max_batch=max_batch, n_draft=n_draft, tree=tree)
        self.owner = owner

    def submit(self, request):
        if self.owner.ignore_eos:
            request = dataclasses.replace(request, eos_id=None)
        row = super().submit(request)
        self.owner.runs.append(Run(row))
        return row

    def step(self):
        if self.owner.fail_next:
            self.owner.fail_next = False
            raise RuntimeError("a failing step")
        events = super().step()
        self.owner.widths.append(len({id(r) for r, _ in events}))
        for run in self.owner.runs:
            run.events += sum(r is run.row for r, _ in events)
        if self.owner.delay:
            time.sleep(self.owner.delay)
        return events


class SlowEngine:
    """`create_app(engine_fn=...)`: engines that pause after each step and (`ignore_eos`) decode to
    the token limit, so that answers last long enough to be stopped. Records each request's run,
    the rows that advanced at each step (`widths`), and fails the next step when `fail_next`."""

    def __init__(self, delay: float = 0.05, ignore_eos: bool = True):
        self.delay, self.ignore_eos, self.fail_next = delay, ignore_eos, False
        self.engines: list[Engine] = []
        self.runs: list[Run] = []
        self.widths: list[int] = []

    def __call__(self, model, max_batch, n_draft, tree=None):
        self.engines.append(RecordingEngine(model, max_batch, n_draft, self, tree))
        return self.engines[-1]

    @property
    def engine(self) -> Engine:
        return self.engines[-1]


@pytest.fixture
def slow_engine():
    return SlowEngine


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
        limits = options.get("limits", Limits())
        servers.append(LiveServer(create_app(tiny[0], tiny[1], model_name="tiny", **options), limits))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def live_server():
    """LiveServer itself, for module-scoped servers of a test file's own."""
    return LiveServer
