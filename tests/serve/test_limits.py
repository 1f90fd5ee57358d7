"""What one client may cost: body size, prompt length, read deadlines, header size; 503 while
shutting down or once the worker died. Raw sockets on loopback, short limits so that it is quick."""

import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtplab.serve import create_app
from mtplab.serve.limits import LINGER_S, Limits

LIMITS = Limits(max_body_bytes=50_000, max_prompt_tokens=40, header_timeout=0.5, body_timeout=0.5,
                keep_alive=1.0, max_header_bytes=4096)
COMPLETION = {"model": "tiny", "prompt": "Ava has", "max_tokens": 4}
POST = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(tiny, live_server):
    s = live_server(create_app(tiny[0], tiny[1], model_name="tiny", limits=LIMITS), LIMITS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def expected(tiny):
    import mtplab
    return mtplab.generate(tiny[0], tiny[1], COMPLETION["prompt"], max_new_tokens=COMPLETION["max_tokens"])


def raw(server, data: bytes, timeout: float = 5.0) -> tuple[float, int | None, bytes]:
    """Send `data` on a fresh connection and read until the server closes it: (seconds, status, all)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        t0 = time.monotonic()
        if data:
            s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        seconds = time.monotonic() - t0
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else None
    return seconds, status, out


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) // 1024


def body_json(out: bytes) -> dict:
    return json.loads(out.split(b"\r\n\r\n", 1)[1])


def assert_serves(server, expected):
    r = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("data, status", [
    (b"", 408),  # a connection that sends nothing
    (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n", 408),  # headers that never end
    (POST + b"Content-Length: 100\r\n\r\n0123456789", 408),  # a body shorter than announced
    (POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc", 408),  # a chunk of 2^80 bytes
    (POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n", 408),  # no last chunk
])
def test_a_slow_or_silent_client_is_cut_off_within_the_deadline(server, expected, data, status):
    seconds, got, out = raw(server, data)
    assert got == status and b"connection: close" in out.lower(), out
    assert 0.4 < seconds < 0.5 + 1.5  # the deadline, not the client's timeout
    assert body_json(out)["error"]["code"] == "request_timeout"
    assert_serves(server, expected)


def test_silent_connections_do_not_tie_the_server_up(server, expected):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        assert_serves(server, expected)  # while 40 say nothing
        time.sleep(LIMITS.header_timeout + 0.5)
        for s in idle:  # each was answered 408 and closed
            s.settimeout(2)
            assert s.recv(100).startswith(b"HTTP/1.1 408")
    finally:
        for s in idle:
            s.close()


def test_a_body_over_the_limit_is_a_413_before_it_is_read(server, expected):
    # announced: answered at once, though the client has sent almost none of it
    seconds, status, out = raw(server, POST + b"Content-Length: 100000000\r\n\r\n" + b"x" * 1000)
    assert status == 413 and seconds < 0.4 and b"connection: close" in out.lower()
    assert body_json(out)["error"]["code"] == "request_too_large"
    # chunked: refused once the limit has come; what the client goes on sending is dropped, not
    # kept (this process's memory, the server's included, stays flat), and the connection closes
    # after LINGER_S however much more it sends
    peak, start, done = [0], rss_mb(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        sent, chunk, t0 = 0, b"10000\r\n" + b"x" * 0x10000 + b"\r\n", time.monotonic()
        with pytest.raises(OSError):  # the server closed
            while time.monotonic() - t0 < LINGER_S + 1.5:
                s.sendall(chunk)
                sent += 0x10000
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    done.set()
    sampler.join()
    assert peak[0] - start < 32, (start, peak[0], sent)
    # an ordinary client sending all of it first still reads the 413
    r = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": "x" * 5_000_000}, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_serves(server, expected)


def test_headers_over_the_limit_are_a_431(server, expected):
    for head in [b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",  # in one piece
                 b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-Many: a\r\n" * 600]:  # not yet complete
        _, status, out = raw(server, head)
        assert status == 431 and b"connection: close" in out.lower(), out[:200]
    assert_serves(server, expected)


def test_the_prompt_token_limit(server, tiny):
    r = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": list(range(1, 42))}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert r.json()["error"]["param"] == "prompt" and "at most 40" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "prompt": list(range(1, 41))}, timeout=10)
    assert r.status_code == 200


def test_keep_alive_connections_close_when_idle(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the headers and the JSON body may come apart
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server
        assert LIMITS.keep_alive - 0.2 < time.monotonic() - t0 < LIMITS.keep_alive + 1.5


def test_bad_limits():
    for bad in [{"max_body_bytes": 0}, {"header_timeout": 0}, {"max_prompt_tokens": 0}, {"max_connections": -1}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)


def test_503_with_retry_after_while_shutting_down(serve_app, slow_engine):
    slow = slow_engine(delay=0.05)
    server = serve_app(engine_fn=slow)
    results = {}

    def running():  # a request decoding when the server is told to stop
        results["running"] = httpx.post(server.url + "/v1/completions",
                                        json={**COMPLETION, "max_tokens": 100}, timeout=20)
    thread = threading.Thread(target=running)
    thread.start()
    deadline = time.monotonic() + 10
    while server.health()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.app.state.drain(0.5)
    r = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "unavailable"
    assert "shutting down" in r.json()["error"]["message"]
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    thread.join(timeout=10)
    assert results["running"].status_code == 503  # ended by the stop, not left hanging
    assert results["running"].headers["retry-after"] == "5"


def test_503_once_the_model_worker_has_died(serve_app):
    server = serve_app()
    worker = server.app.state.worker()

    def broken(*args):
        raise RuntimeError("a bug in the worker's loop")
    worker._step_engine = broken  # the next request's step kills the thread
    r = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert "died" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=10)
    assert r.status_code == 503
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503


def read_answer(sock, timeout: float) -> bytes:
    """One response (headers and Content-Length body), or what came before the server closed."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            head, sep, rest = out.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                if len(rest) >= length:
                    return out
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


hex_sizes = st.one_of(st.integers(0, 2**90).map(lambda n: f"{n:x}".encode()),
                      st.sampled_from([b"", b"-1", b"zz", b"0x10", b"5;ext=1", b" 5", b"f" * 40]))
raw_requests = st.one_of(
    # a body shorter (or longer) than announced
    st.builds(lambda n, k: POST + b"Content-Length: %d\r\n\r\n" % n + b"{" * k,
              st.integers(0, 200_000), st.integers(0, 300)),
    # chunking: arbitrary sizes and data, terminated or not
    st.builds(lambda chunks, end: POST + b"Transfer-Encoding: chunked\r\n\r\n"
              + b"".join(size + b"\r\n" + data + b"\r\n" for size, data in chunks) + (b"0\r\n\r\n" if end else b""),
              st.lists(st.tuples(hex_sizes, st.binary(max_size=12)), max_size=3), st.booleans()),
    # headers around the size limit, or odd ones
    st.builds(lambda n, name: b"GET /health HTTP/1.1\r\nHost: t\r\n" + name + b": " + b"a" * n + b"\r\n\r\n",
              st.integers(0, 2 * LIMITS.max_header_bytes), st.sampled_from([b"X-A", b"Content-Length", b"Host"])),
    # anything at all
    st.binary(max_size=80),
    st.builds(lambda line: line + b"\r\n\r\n", st.binary(max_size=60)),
)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=raw_requests)
def test_generated_raw_http_never_5xx_and_the_server_goes_on(server, expected, data):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        t0 = time.monotonic()
        try:
            s.sendall(data)
        except OSError:  # refused and closed before it was all sent
            pass
        out = read_answer(s, LIMITS.body_timeout + LIMITS.header_timeout + 2)
        assert time.monotonic() - t0 < LIMITS.body_timeout + LIMITS.header_timeout + 1.5  # an answer, in time
    assert out.startswith(b"HTTP/1.1 "), (data[:200], out[:100])  # every client hears why
    assert int(out.split(b" ", 2)[1]) < 500, (data[:200], out[:300])
    assert_serves(server, expected)
