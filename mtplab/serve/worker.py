"""The model worker: one thread owns the model and steps the requests' decoders in turn.

PyTorch work never runs on the event loop, so a long generation cannot stall other clients (or
`/health`). Requests wait in a bounded queue; `submit` refuses one beyond the limit at once, which
the app answers with 429. Up to `max_active` requests decode together, one event (one forward) each
in round-robin, so a new request's first token comes after at most one forward of every other
active request rather than after their whole answers. A cancelled request (the client went away or
pressed stop) is dropped before its next forward, and leaves the queue at once if still waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import MtplabError

log = logging.getLogger("mtplab.serve")


class QueueFull(Exception):
    """Every one of the worker's `max_active` places is taken and `max_queue` requests wait."""


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Ticket:
    """One request's place in the worker: its decoder factory and the asyncio side of its stream.

    `start` runs on the worker thread and returns the iterator whose items are streamed; the items
    cross to the event loop through an asyncio queue."""

    END = _END  # the item after the last one

    def __init__(self, start: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.start = start
        self.loop = loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.completed = False  # the consumer has the last item; a cancel now is just cleanup
        self.worker: Worker | None = None

    # -- worker thread --------------------------------------------------------------------------
    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    # -- event loop -----------------------------------------------------------------------------
    async def get(self) -> Any:
        """The next item; raises the decoder's exception if it failed; `Ticket.END` when done."""
        item = await self.items.get()
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def cancel(self) -> None:
        self.cancelled.set()
        if self.worker is not None:
            self.worker._forget(self)


class Worker:
    def __init__(self, max_queue: int = 64, max_active: int = 16):
        if max_queue < 0 or max_active < 1:
            raise ValueError("max_queue must be >= 0 and max_active >= 1")
        self.max_queue, self.max_active = max_queue, max_active
        self.waiting: deque[Ticket] = deque()
        self.active: dict[Ticket, Iterator | None] = {}
        self.finished = self.cancelled = 0  # requests done or dropped, for /health and tests
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mtplab-model-worker", daemon=True)
        self._thread.start()

    def submit(self, start: Callable[[], Iterator[Any]]) -> Ticket:
        """Queue a request (call on the event loop); raises QueueFull when every place is taken."""
        ticket = Ticket(start, asyncio.get_running_loop())
        with self._cond:
            if len(self.waiting) + len(self.active) >= self.max_queue + self.max_active:
                raise QueueFull(f"{len(self.active)} requests are decoding and {len(self.waiting)} "
                                "are waiting; try again later")
            ticket.worker = self
            self.waiting.append(ticket)
            self._cond.notify()
        return ticket

    def _forget(self, ticket: Ticket) -> None:
        # a waiting request frees its place now; an active one is dropped before its next forward
        with self._cond:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                self.cancelled += 1

    def _drop(self, ticket: Ticket, iterator: Iterator | None, outcome: str) -> None:
        with self._cond:
            self.active.pop(ticket, None)
            if outcome == "finished":
                self.finished += 1
            else:
                self.cancelled += 1
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()  # runs the decoder's cleanup now, on this thread

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self.waiting or self.active):
                    self._cond.wait()
                if self._stopping:
                    break
                while self.waiting and len(self.active) < self.max_active:
                    self.active[self.waiting.popleft()] = None
                turn = list(self.active.items())
            for ticket, iterator in turn:
                self._step(ticket, iterator)
        # shutting down: nobody is left waiting for an answer that will not come
        with self._cond:
            left = list(self.active.items()) + [(t, None) for t in self.waiting]
            self.waiting.clear()
        for ticket, iterator in left:
            ticket._put(_Failure(MtplabError("the server is shutting down")))
            self._drop(ticket, iterator, "cancelled")

    def _step(self, ticket: Ticket, iterator: Iterator | None) -> None:
        if ticket.cancelled.is_set():
            self._drop(ticket, iterator, "finished" if ticket.completed else "cancelled")
            return
        try:
            if iterator is None:
                iterator = self.active[ticket] = ticket.start()
            item = next(iterator)
        except StopIteration:
            ticket._put(_END)
            self._drop(ticket, None, "finished")
        except Exception as exc:  # reported to the request's client; the worker keeps serving
            if not isinstance(exc, MtplabError):
                log.exception("decoding failed")
            ticket._put(_Failure(exc))
            self._drop(ticket, iterator, "finished")
        else:
            ticket._put(item)
