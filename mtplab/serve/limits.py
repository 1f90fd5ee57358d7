"""What one client may cost the server: body size, prompt length, read deadlines, connections.

The HTTP layer is uvicorn's h11 protocol; what it lacks is added here, the rest is its own settings:

- headers: `header_timeout` seconds from a connection's first byte (or its opening, or the end of
  the previous answer once the client sends again) to the end of the request's headers, else a 408
  and the connection closes (a silent or slow client, slowloris); a request line and headers over
  `max_header_bytes` are a 431. uvicorn has a keep-alive timeout but neither of these (h11's own
  size limit holds only for headers that come in pieces), so `http_protocol` adds them.
- body: `ReadBody`, an ASGI layer, reads the whole body before the app sees it: a
  `Content-Length` over `max_body_bytes` is a 413 at once, a chunked body is a 413 as soon as
  that much has come (never more is read), and a body not complete `body_timeout` seconds after
  its headers is a 408. Each closes the connection (`Connection: close`): the rest of the body is
  never read, only drained for up to LINGER_S seconds (read and dropped, so that the client,
  still sending, reads the answer instead of a connection reset).
- `keep_alive` (idle seconds between requests) and `max_connections` (beyond it uvicorn answers
  503) are uvicorn's `timeout_keep_alive` and `limit_concurrency`.
- `max_prompt_tokens` (None: the context window less one) is checked by the app (400).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


LINGER_S = 2.0  # after refusing a body: how long the rest is drained before the connection closes


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB: some 250k tokens of text, far beyond any context here
    max_prompt_tokens: int | None = None  # None: the model's context window less one
    header_timeout: float = 5.0  # seconds to send the request line and headers
    body_timeout: float = 10.0  # seconds to send the body, after the headers
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 256  # open connections (and requests in flight) before uvicorn's 503
    max_header_bytes: int = 16 << 10  # request line + headers (h11's default)

    def __post_init__(self):
        for name in ("max_body_bytes", "header_timeout", "body_timeout", "keep_alive", "max_connections",
                     "max_header_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


def _json_bytes(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def _reject(send, status: int, message: str, code: str) -> None:
    body = _json_bytes(status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ReadBody:
    """ASGI: the request's body, read within `max_bytes` and `timeout` seconds, is handed to the
    app in one message; later `receive` calls (a disconnect) go to the server as usual."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = (f"the request body is over this server's limit of {self.max_bytes} bytes",
                   "request_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:  # h11 has checked its syntax
            await _reject(send, 413, *too_big)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                await _reject(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                              "request_timeout")
                return
            if message["type"] == "http.disconnect":
                return  # the client left before its request was complete: nobody to answer
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _reject(send, 413, *too_big)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        whole: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        del chunks

        async def replay():
            nonlocal whole
            if whole is None:
                return await receive()
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)


def http_protocol(header_timeout: float, max_header_bytes: int):
    """uvicorn's h11 protocol with a deadline and a size limit on each request's line and headers
    (see above)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        header_bytes = 0  # received towards the next request's headers

        def _arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self._too_slow)
                self.header_bytes = 0

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
            """An answer before any request could begin (h11 has none to answer), then close."""
            self._disarm()
            if self.transport.is_closing():
                return
            body = _json_bytes(status, message, code)
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))
            self.transport.close()

        def _too_slow(self) -> None:
            self.header_timer = None
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within "
                         f"{header_timeout:g} s", "request_timeout")

        def connection_made(self, transport) -> None:
            super().connection_made(_Lingering(transport, self))
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.transport.draining:  # the answer is out; what the client still sends is dropped
                return
            if self.cycle is None or self.cycle.response_complete:  # between requests: a new one begins
                self._arm()
            if self.header_timer is not None:  # reading headers: count them up to their blank line
                end = data.find(b"\r\n\r\n")
                self.header_bytes += len(data) if end < 0 else end + 4
                if self.header_bytes > max_header_bytes:
                    self._refuse(431, "Request Header Fields Too Large", "the request line and headers are "
                                 f"over this server's limit of {max_header_bytes} bytes", "headers_too_large")
                    return
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete: the request runs
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return LimitedH11Protocol


class _Lingering:
    """The connection's transport, but `close()` while the client is still sending a body (a
    refused one) ends our side (FIN) and drops what comes for up to LINGER_S seconds before it
    closes: a close with unread data would reset the connection, and the client could lose the
    413 it was sent."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.draining = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.draining or self._transport.is_closing()

    def close(self) -> None:
        import h11

        if self.draining or self._transport.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.draining = True
        self._transport.write_eof()  # the answer is flushed first; the client reads it, then EOF
        self._protocol.flow.resume_reading()  # uvicorn paused reading the body the app never took
        self._protocol.loop.call_later(LINGER_S, self._transport.close)


def uvicorn_config(app, limits: Limits = Limits(), **options):
    """A `uvicorn.Config` for `app` that enforces `limits` at the HTTP layer."""
    import uvicorn

    return uvicorn.Config(app, http=http_protocol(limits.header_timeout, limits.max_header_bytes),
                          timeout_keep_alive=limits.keep_alive,
                          limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **options)
