"""Continuous batching: many requests decoded together give each its own answer, alone or not."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import mtplab
from tests.serve.conftest import client, sse_chunks

# (chat?, prompt, max_tokens, stream?, speculative): different lengths, limits and decoders at once
REQUESTS = [
    (True, "Ava has 3 apples. Then Ava buys 2 more apples. How many apples does Ava have now?", 24, True, None),
    (False, "Ben has", 30, False, None),
    (True, "Cleo has 12 pens.", 9, False, False),
    (False, "Ava has 3 apples.", 40, True, False),
    (True, "Dan has 5 cars and sells 2. How many?", 17, True, True),
    (False, "7 +", 5, True, None),
    (True, "Eve has 20 books. She gives 4 away. How many books does Eve have left?", 33, False, None),
    (False, "Fay has 9 cups and buys 9 more cups.", 21, False, True),
    (True, "How many?", 12, True, None),
    (False, "Gus", 26, True, None),
    (True, "Ava has 3 apples and buys 4 more. How many apples?", 14, False, False),
    (False, "Hal has 2 dogs. Then", 36, True, None),
]


def ask(server, chat, prompt, max_tokens, stream, speculative, **sampling):
    c = client(server).with_options(timeout=120)
    extra = {} if speculative is None else {"speculative": speculative}
    options = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "extra_body": extra, **sampling}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            return "".join(ch.choices[0].delta.content or ""
                           for ch in c.chat.completions.create(messages=messages, stream=True, **options))
        return c.chat.completions.create(messages=messages, **options).choices[0].message.content
    if stream:
        return "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompt, stream=True, **options))
    return c.completions.create(prompt=prompt, **options).choices[0].text


def all_at_once(server, requests, **sampling):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: ask(server, *r, **sampling), requests))


def test_concurrent_greedy_texts_equal_one_at_a_time_and_generate(serve_app, slow_engine, tiny):
    model, tok, _ = tiny
    expected = [mtplab.generate(model, tok, p, chat=chat, max_new_tokens=n, speculative=spec)
                for chat, p, n, _, spec in REQUESTS]
    batched_engine, single_engine = slow_engine(0.005, ignore_eos=False), slow_engine(0.0, ignore_eos=False)
    batched = serve_app(engine_fn=batched_engine)
    single = serve_app(max_batch=1, engine_fn=single_engine)
    assert all_at_once(batched, REQUESTS) == expected
    assert max(batched_engine.widths) > 1  # they really were decoded together
    assert [ask(batched, *r) for r in REQUESTS] == expected  # one at a time
    assert all_at_once(single, REQUESTS) == expected
    assert max(single_engine.widths) == 1  # --max-batch 1: one request decodes at a time
    for server in (batched, single):
        health = server.wait_idle()
        assert health["finished"] == len(REQUESTS) * (2 if server is batched else 1)
        assert health["cancelled"] == 0
    assert not batched_engine.engine.rows and not single_engine.engine.rows


def test_seeded_sampling_in_a_batch_repeats_it_alone(live, tiny):
    model, tok, _ = tiny
    sampled = [(False, "Ava has", 24, False, None), (True, "Ben has 4 pens.", 20, True, False)]
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
    alone = [ask(live, *r, **sampling) for r in sampled]
    assert alone[0] == mtplab.generate(model, tok, "Ava has", max_new_tokens=24, temperature=1.0, top_p=0.9,
                                       seed=7)
    assert alone[1] == mtplab.generate(model, tok, "Ben has 4 pens.", chat=True, max_new_tokens=20,
                                       temperature=1.0, top_p=0.9, seed=7, speculative=False)
    others = REQUESTS[:6]  # greedy neighbours, and sampled ones with other seeds
    with ThreadPoolExecutor(len(sampled) + len(others) + 2) as pool:
        mine = [pool.submit(ask, live, *r, **sampling) for r in sampled]
        noise = [pool.submit(ask, live, *r) for r in others]
        noise += [pool.submit(ask, live, *sampled[0], temperature=1.0, seed=s) for s in (1, 2)]
        assert [f.result() for f in mine] == alone
        [f.result() for f in noise]


def test_a_disconnected_stream_frees_its_row_while_others_decode(serve_app, slow_engine):
    slow = slow_engine(delay=0.03)  # ignores end-of-text: answers run to their limit
    server = serve_app(engine_fn=slow)
    body = {"model": "tiny", "prompt": "Ava has", "max_tokens": 100, "stream": True}
    other: dict = {}
    first = threading.Event()

    def long_answer():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    first.set()
            other["chunks"] = chunks

    thread = threading.Thread(target=long_answer)
    thread.start()
    assert first.wait(20)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "prompt": "Ben has"}, timeout=30) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    gone = slow.runs[1]
    deadline = time.monotonic() + 5
    while gone.row in slow.engine.rows:
        assert time.monotonic() < deadline, "the disconnected stream's row is still in the batch"
        time.sleep(0.01)
    assert gone.closed and gone.events < 100
    assert not slow.runs[0].row.done  # the other answer goes on, alone in the batch
    thread.join(30)
    assert other["chunks"][-1]["usage"]["completion_tokens"] == 100
    health = server.wait_idle()
    assert health["cancelled"] == 1 and health["finished"] == 1
    assert not slow.engine.rows and not slow.engine.waiting


def test_a_stop_string_ends_the_row_at_once(serve_app, slow_engine, tiny):
    model, tok, _ = tiny
    q = REQUESTS[0][1]
    full = mtplab.generate(model, tok, q, chat=True, max_new_tokens=24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    slow = slow_engine(0.0, ignore_eos=False)
    server = serve_app(engine_fn=slow)
    answer = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                    max_tokens=24, stop=stop)
    assert answer.choices[0].message.content == full[:full.index(stop)]
    health = server.wait_idle()
    assert health["finished"] == 1 and health["cancelled"] == 0  # answered, so finished, for the worker
    assert slow.runs[0].closed and slow.runs[0].events < 24  # in the engine, the row was stopped there
    assert not slow.engine.rows


def test_a_failing_step_fails_its_batch_and_the_server_goes_on(serve_app, slow_engine):
    slow = slow_engine(delay=0.03)
    server = serve_app(engine_fn=slow)
    body = {"model": "tiny", "prompt": "Ava has", "max_tokens": 60, "stream": True}
    results = []

    def stream(prompt):
        results.append(sse_chunks(server, "/v1/completions", {**body, "prompt": prompt}))

    threads = [threading.Thread(target=stream, args=(p,)) for p in ("Ava has", "Ben has")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(slow.runs) < 2 or not all(run.events for run in slow.runs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    slow.fail_next = True
    for t in threads:
        t.join(30)
    for raw in results:
        assert raw[-1] == "[DONE]"
        error = json.loads(raw[-2])["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    answer = client(server).completions.create(model="tiny", prompt="Ava", max_tokens=3)
    assert answer.usage.completion_tokens == 3  # still serving, in a fresh engine
    assert len(slow.engines) == 2
    assert server.wait_idle()["finished"] == 3
