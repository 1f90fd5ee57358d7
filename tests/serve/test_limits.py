"""What one client may cost: body size, prompt length, read deadlines, header size; 503 while
shutting down or once the worker died. Raw sockets on loopback, short limits so that it is quick."""

import json
import socket
import threading
import time

import httpx
import pytest

from mtplab.serve import create_app
from mtplab.serve.limits import Limits

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
    # chunked: refused once the limit has come; the server stops reading, so 64 MB cannot be sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        sent, chunk = 0, b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        try:
            while sent < 64 << 20:
                s.sendall(chunk)
                sent += 0x10000
        except OSError:  # reset: the server closed with the rest unread
            pass
        assert sent < 32 << 20, sent
        assert s.recv(200).startswith(b"HTTP/1.1 413")
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
