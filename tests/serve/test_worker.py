"""The model worker on its own: round-robin turns, the queue limit, cancellation, failures."""

import asyncio
import itertools
import threading

import pytest

from mtplab.errors import MtplabError
from mtplab.serve.worker import QueueFull, Ticket, Worker


async def drain(ticket):
    items = []
    while (item := await ticket.get()) is not Ticket.END:
        items.append(item)
    return items


def held(inside, gate):
    """A request that blocks the worker (inside its first step) until `gate` opens."""
    def start():
        inside.set()
        yield gate.wait()
    return start


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_active_requests_take_turns():
    order = []

    def counting(name, n):
        def start():
            for i in range(n):
                order.append(name)
                yield f"{name}{i}"
        return start

    async def main():
        worker = Worker(max_queue=4, max_batch=3)
        inside, gate = threading.Event(), threading.Event()
        blocker = worker.submit(held(inside, gate))  # holds the worker until both are queued
        await asyncio.to_thread(inside.wait, 10)
        a = worker.submit(counting("a", 3))
        b = worker.submit(counting("b", 3))
        gate.set()
        results = await asyncio.gather(drain(blocker), drain(a), drain(b))
        worker.stop()
        return results

    _, a, b = run(main())
    assert a == ["a0", "a1", "a2"] and b == ["b0", "b1", "b2"]
    assert order == ["a", "b", "a", "b", "a", "b"]  # interleaved, not one answer after the other


def test_queue_limit_and_a_cancelled_waiter_frees_its_place():
    async def main():
        worker = Worker(max_queue=1, max_batch=1)
        inside, gate = threading.Event(), threading.Event()
        running = worker.submit(held(inside, gate))
        await asyncio.to_thread(inside.wait, 10)
        waiting = worker.submit(lambda: iter(["never"]))
        with pytest.raises(QueueFull):
            worker.submit(lambda: iter(["refused"]))
        waiting.cancel()
        assert not worker.waiting and worker.cancelled == 1
        third = worker.submit(lambda: iter(["third"]))
        gate.set()
        out = await drain(running), await drain(third)
        worker.stop()
        return out

    assert run(main()) == ([True], ["third"])


def test_cancel_stops_an_active_request_between_items():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield "x"
        finally:
            closed.set()

    async def main():
        worker = Worker()
        ticket = worker.submit(endless)
        assert await ticket.get() == "x"
        ticket.cancel()
        assert await asyncio.to_thread(closed.wait, 10)
        while worker.active:
            await asyncio.sleep(0.01)
        worker.stop()
        return worker.cancelled

    assert run(main()) == 1


def test_a_failing_request_reports_its_error_and_the_worker_goes_on():
    def bad():
        yield 1
        raise MtplabError("n_draft must be between 0 and 1")

    async def main():
        worker = Worker()
        failing = worker.submit(bad)
        assert await failing.get() == 1
        with pytest.raises(MtplabError, match="n_draft"):
            await failing.get()
        fine = await drain(worker.submit(lambda: iter([1, 2])))
        worker.stop()
        return fine

    assert run(main()) == [1, 2]


def test_stopping_fails_the_requests_left():
    async def main():
        worker = Worker(max_queue=2, max_batch=1)
        endless = worker.submit(lambda: itertools.repeat("x"))
        assert await endless.get() == "x"
        waiting = worker.submit(lambda: iter(["never"]))
        await asyncio.to_thread(worker.stop)
        with pytest.raises(MtplabError, match="shutting down"):
            await waiting.get()
        return worker.cancelled

    assert run(main()) == 2
