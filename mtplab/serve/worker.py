"""The model worker: one thread owns the model and decodes every request, many at once.

PyTorch work never runs on the event loop, so a long generation cannot stall other clients (or
`/health`). Requests wait in a bounded queue; `submit` refuses one beyond the limit at once, which
the app answers with 429. Up to `max_batch` requests decode together:

- jobs (`submit_job`, a Transformer's requests) are rows of a batched engine
  (inference/engine.py), made on the worker thread: one per think-loop count in use, since a looped
  trunk's KV cache is laid out for one count (the default count's engine stays; another count's is
  made for the first request that asks for it and freed when its last row leaves). The thread runs
  each engine's `step()` while it has work: a request taken from the queue joins the running batch at the next step boundary
  (its prompt is prefilled in that step while the others decode), every step is one forward for
  all rows, and a request that finished, reached a stop string or was cancelled leaves at once
  (its cache row is free before the next forward). If a step fails, every request in the batch
  gets the error and the next request (of that count) starts in a fresh engine.
- decoders (`submit`: an iterator factory, e.g. a Monostep model's batch-1 block decoder) take
  turns, one event (one forward) each in round-robin.

A cancelled request (the client went away or pressed stop) is dropped before its next forward, and
leaves the queue at once if still waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import MtplabError

log = logging.getLogger("mtplab.serve")


class QueueFull(Exception):
    """Every one of the worker's `max_batch` places is taken and `max_queue` requests wait."""


class Unavailable(MtplabError):
    """The worker takes no more requests: the server is shutting down, or the worker has died."""


class Job(Protocol):
    """A request for the engine. `request()` (worker thread, once, at admission) returns its
    `inference.engine.Request`; `feed(event)` turns each of its events into (the item to stream,
    whether it is the last one)."""

    def request(self) -> Any: ...

    def feed(self, event: Any) -> tuple[Any, bool]: ...


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Ticket:
    """One request's place in the worker: its work (a decoder factory or an engine job) and the
    asyncio side of its stream.

    `start` runs on the worker thread and returns the iterator whose items are streamed; a job's
    items are what its `feed` makes of the engine's events. The items cross to the event loop
    through an asyncio queue."""

    END = _END  # the item after the last one

    def __init__(self, start: Callable[[], Iterator[Any]] | None, loop: asyncio.AbstractEventLoop,
                 job: Job | None = None, think_loops: int = 1):
        self.start, self.job = start, job
        self.think_loops = think_loops  # a job's: the engine it is a row of
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
    """`engine(think_loops)`: makes a batched engine whose KV cache is laid out for that many think
    loops (called on the worker thread, for the first job of each count); `think_loops`: the count of
    jobs submitted without one."""

    def __init__(self, max_queue: int = 64, max_batch: int = 16,
                 engine: Callable[[int], Any] | None = None, think_loops: int = 1):
        if max_queue < 0 or max_batch < 1:
            raise ValueError("max_queue must be >= 0 and max_batch >= 1")
        self.max_queue, self.max_batch = max_queue, max_batch
        self.make_engine, self.think_loops = engine, think_loops
        self.engines: dict[int, Any] = {}  # think loops -> its engine; worker thread only
        self.waiting: deque[Ticket] = deque()
        self.active: dict[Ticket, Any] = {}  # -> its iterator or engine row (None until started)
        self.finished = self.cancelled = 0  # requests done or dropped, for /health and tests
        self._cond = threading.Condition()
        self._stopping = False
        self.unavailable: str | None = None  # why it takes no more requests (shutting down, died)
        self._thread = threading.Thread(target=self._serve, name="mtplab-model-worker", daemon=True)
        self._thread.start()

    def submit(self, start: Callable[[], Iterator[Any]]) -> Ticket:
        """Queue a decoder (call on the event loop); raises QueueFull when every place is taken."""
        return self._queue(Ticket(start, asyncio.get_running_loop()))

    def submit_job(self, job: Job, think_loops: int | None = None) -> Ticket:
        """Queue a request for the batched engine of `think_loops` (None: the worker's default);
        raises QueueFull when every place is taken."""
        if self.make_engine is None:
            raise ValueError("this worker has no engine")
        loops = self.think_loops if think_loops is None else think_loops
        return self._queue(Ticket(None, asyncio.get_running_loop(), job, loops))

    def _queue(self, ticket: Ticket) -> Ticket:
        with self._cond:
            if self.unavailable:
                raise Unavailable(self.unavailable)
            if len(self.waiting) + len(self.active) >= self.max_queue + self.max_batch:
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
            self.unavailable = self.unavailable or "the server is shutting down"
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug in the loop itself: tell every request, take no more
            log.exception("the model worker died", exc_info=exc)
            with self._cond:
                self.unavailable = "the model worker has died (see the server's log); restart the server"
                left = list(self.active) + list(self.waiting)
                self.active.clear()
                self.waiting.clear()
            for ticket in left:
                ticket._put(_Failure(Unavailable(self.unavailable)))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self.waiting or self.active):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self.waiting and len(self.active) < self.max_batch:
                    admitted.append(self.waiting.popleft())
                    self.active[admitted[-1]] = None
                turn = list(self.active)
            for ticket in admitted:
                if ticket.job is not None:
                    self._admit(ticket)
            jobs = [t for t in turn if t.job is not None]
            for loops, engine in list(self.engines.items()):  # one forward per engine with work
                mine = [t for t in jobs if t.think_loops == loops]
                if mine or engine.busy:
                    self._step_engine(loops, mine)
                if loops != self.think_loops and loops in self.engines and not self.engines[loops].busy:
                    del self.engines[loops]  # its last row left: free that count's KV cache
            for ticket in turn:
                if ticket.job is None and ticket in self.active:
                    self._step(ticket, self.active[ticket])
        # shutting down: nobody is left waiting for an answer that will not come
        with self._cond:
            left = list(self.active.items()) + [(t, None) for t in self.waiting]
            self.waiting.clear()
        for ticket, work in left:
            ticket._put(_Failure(Unavailable("the server is shutting down")))
            self._drop(ticket, work if ticket.job is None else None, "cancelled")

    # -- decoders, in turn ------------------------------------------------------------------------
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
            self._fail(ticket, exc)
            self._drop(ticket, iterator, "finished")
        else:
            ticket._put(item)

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        if not isinstance(exc, MtplabError):
            log.exception("decoding failed", exc_info=exc)
        ticket._put(_Failure(exc))

    # -- jobs, one batch ----------------------------------------------------------------------------
    def _admit(self, ticket: Ticket) -> None:
        """Into the engine's queue: it prefills at the next step, alongside the decoding rows."""
        try:
            if ticket.think_loops not in self.engines:
                self.engines[ticket.think_loops] = self.make_engine(ticket.think_loops)
            row = self.engines[ticket.think_loops].submit(ticket.job.request())
        except Exception as exc:  # this request's own problem
            self._fail(ticket, exc)
            self._drop(ticket, None, "finished")
            return
        with self._cond:
            self.active[ticket] = row

    def _step_engine(self, loops: int, tickets: list[Ticket]) -> None:
        """One step of the engine of `loops` think loops, whose rows `tickets` are."""
        engine = self.engines[loops]
        live = {}  # row -> ticket
        leaving = []  # (ticket, outcome), counted once their rows are free
        for ticket in tickets:
            row = self.active.get(ticket)
            if row is None:  # it failed at admission
                continue
            if ticket.cancelled.is_set():
                engine.cancel(row)  # its row is freed as the step begins
                leaving.append((ticket, "finished" if ticket.completed else "cancelled"))
            else:
                live[row] = ticket
        try:
            events = engine.step()  # with nobody left, this only frees the cancelled rows
        except Exception as exc:  # the batch's state is unknown: fail its requests, start afresh
            log.exception("a batched decoding step failed; failing its %d requests", len(live))
            for ticket in live.values():
                ticket._put(_Failure(exc))
                leaving.append((ticket, "finished"))
            del self.engines[loops]
            events = []
            live = {}
        for row, event in events:
            ticket = live.get(row)
            if ticket is None:
                continue
            try:
                item, last = ticket.job.feed(event)
            except Exception as exc:
                engine.cancel(row)
                self._fail(ticket, exc)
                last = True
            else:
                ticket._put(item)
                if last and not row.done:
                    engine.cancel(row)  # a stop string: the row frees before the next forward
                elif row.done and not last:
                    ticket._put(_END)
            if last or row.done:
                leaving.append((ticket, "finished"))
                del live[row]
        if not live and loops in self.engines and engine.busy:
            engine.step()  # nobody left: free the stopped rows now, not when the next request comes
        for ticket, outcome in leaving:
            self._drop(ticket, None, outcome)
