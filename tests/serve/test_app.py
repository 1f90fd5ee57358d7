"""The server as the official `openai` client sees it, on a real loopback port."""

import json
import time

import httpx
import openai
import pytest

import mtplab
from mtplab.cli import main
from tests.serve.conftest import client, sse_chunks

Q = "Ava has 3 apples. Then Ava buys 2 more apples. How many apples does Ava have now?"
N = 24  # tokens per answer: small, the tests are about plumbing


def test_health_and_models(live, tiny):
    assert live.health()["status"] == "ok"
    models = client(live).models.list().data
    assert [m.id for m in models] == ["tiny"]
    info = models[0].model_extra["mtplab"]
    assert info["context_length"] == tiny[0].config.max_seq_len and info["heads"] == tiny[0].n_future


def test_completions_greedy_equal_generate(live, tiny):
    model, tok, _ = tiny
    expected = mtplab.generate(model, tok, "Ben has", max_new_tokens=N)
    answer = client(live).completions.create(model="tiny", prompt="Ben has", max_tokens=N, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.usage.prompt_tokens == len(tok.encode("Ben has"))
    assert 1 <= answer.usage.completion_tokens <= N
    stream = client(live).completions.create(model="tiny", prompt="Ben has", max_tokens=N, temperature=0,
                                             stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_chat_greedy_equals_the_cli(live, tiny, capsys):
    assert main(["generate", str(tiny[2]), "--chat", "--prompt", Q, "--max-new-tokens", str(N)]) == 0
    expected = capsys.readouterr().out[:-1]  # the CLI ends the answer with a newline
    assert expected
    messages = [{"role": "user", "content": Q}]
    answer = client(live).chat.completions.create(model="tiny", messages=messages, max_tokens=N,
                                                  temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(tiny[1].encode_chat(Q))
    chunks = list(client(live).chat.completions.create(model="tiny", messages=messages, max_tokens=N,
                                                       temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_chunks_carry_drafts_accepted_and_tau(live, tiny):
    body = {"model": "tiny", "prompt": "Ava has 3 apples.", "max_tokens": 40, "stream": True}
    raw = sse_chunks(live, "/v1/completions", body)
    assert raw[-1] == "[DONE]"
    chunks = [json.loads(c) for c in raw[:-1]]
    tokens = 0
    for forwards, c in enumerate(chunks, 1):
        ext = c["mtplab"]
        assert len(ext["accepted"]) == len(ext["tokens"]) >= len(ext["segments"])
        # accepted drafts come first in a block; after the first rejection the model computes
        assert ext["accepted"] == sorted(ext["accepted"], reverse=True)
        assert sum(ext["accepted"]) <= len(ext["drafts"])
        assert "".join(s["text"] for s in ext["segments"]) == c["choices"][0]["text"]
        tokens += len(ext["tokens"])
        assert ext["tau"] == pytest.approx(tokens / forwards, abs=1e-3)
    assert chunks[-1]["usage"]["completion_tokens"] == tokens
    assert "acceptance_by_position" in chunks[-1]["mtplab"]
    plain = [json.loads(c) for c in sse_chunks(live, "/v1/completions", {**body, "speculative": False})[:-1]]
    # lossless: the same text without speculation, one token per forward, nothing accepted
    assert "".join(c["choices"][0]["text"] for c in plain) == "".join(c["choices"][0]["text"] for c in chunks)
    assert all(len(c["mtplab"]["tokens"]) <= 1 and not any(c["mtplab"]["accepted"]) for c in plain)
    assert plain[-1]["mtplab"]["tau"] <= 1.0


def test_stop_strings_cut_the_answer(live, tiny):
    model, tok, _ = tiny
    full = mtplab.generate(model, tok, Q, chat=True, max_new_tokens=N)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    c = client(live)
    answer = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": Q}],
                                       max_tokens=N, stop=[stop, "never appears"])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": Q}],
                                         max_tokens=N, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == expected


def test_seeded_sampling_repeats(live):
    c = client(live)
    runs = [c.completions.create(model="tiny", prompt="Ava has", max_tokens=16, temperature=1.0, top_p=0.9,
                                 seed=7, extra_body={"top_k": 50}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_api_key_guards_every_route_but_health_and_the_page(serve_app):
    server = serve_app(api_key="sekret")
    for path in ["/health", "/", "/static/app.js", "/static/style.css"]:  # no data: no key needed
        assert httpx.get(server.url + path).status_code == 200
    assert httpx.get(server.url + "/static/nope.js").status_code == 404
    assert httpx.get(server.url + "/v1/nope").status_code == 401  # unknown routes too
    for path in ["/v1/models", "/v1/models/tiny"]:
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer sekret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="tiny", prompt="Ava", max_tokens=2)
    answer = client(server, key="sekret").completions.create(model="tiny", prompt="Ava", max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_queue_limit_answers_429_and_a_cancel_frees_the_place(serve_app, slow_engine):
    slow = slow_engine(delay=0.05)
    server = serve_app(max_batch=1, max_queue=1, engine_fn=slow)
    body = {"model": "tiny", "prompt": "Ava has", "max_tokens": 100, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/completions", json=body) as first:
        lines = first.iter_lines()  # kept: an abandoned iterator would close the connection
        next(lines)  # decoding now
        with h.stream("POST", server.url + "/v1/completions", json=body) as second:
            assert second.status_code == 200  # waits in the queue
            assert server.health()["waiting"] == 1
            with pytest.raises(openai.RateLimitError) as busy:
                client(server).completions.create(model="tiny", prompt="Ava", max_tokens=2)
            assert busy.value.body["code"] == "queue_full"
        # the second client hung up while waiting: its place is free at once
        deadline = time.monotonic() + 5
        while server.health()["waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert server.health()["cancelled"] == 1
        with h.stream("POST", server.url + "/v1/completions", json=body) as third:
            assert third.status_code == 200
    server.wait_idle()
    assert len(slow.runs) == 1  # the two that waited never started decoding


def test_disconnect_cancels_generation_and_the_loop_stays_free(serve_app, slow_engine):
    slow = slow_engine(delay=0.05)
    server = serve_app(engine_fn=slow)
    body = {"model": "tiny", "prompt": "Ava has", "max_tokens": 120, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        t0 = time.perf_counter()
        assert server.health()["running"] == 1  # /health answers while the model decodes
        assert time.perf_counter() - t0 < 1.0
    health = server.wait_idle(timeout=5)
    assert health["cancelled"] == 1 and health["finished"] == 0
    assert slow.runs[0].closed and slow.runs[0].events < 60
    assert not slow.engine.rows and not slow.engine.waiting  # its row is free


def test_non_streaming_client_that_gives_up_cancels(serve_app, slow_engine):
    slow = slow_engine(delay=0.05)
    server = serve_app(engine_fn=slow)
    body = {"model": "tiny", "prompt": "Ava has", "max_tokens": 120}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.8)
    health = server.wait_idle(timeout=5)
    assert health["cancelled"] == 1
    assert slow.runs[0].closed and slow.runs[0].events < 60
    assert not slow.engine.rows


def test_errors_reach_the_openai_client_as_4xx(live):
    c = client(live)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="Ava", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="tiny", prompt="Ava " * 400, max_tokens=2)
    assert bad.value.body["code"] == "context_length_exceeded" and bad.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": Q}], max_tokens=10**9)
    assert bad.value.body["param"] == "max_tokens"
    assert c.completions.create(model="tiny", prompt="Ava", max_tokens=2).choices[0].text  # still serving


def test_chat_page_and_assets_are_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="static/app.js"' in page.text
    assert httpx.get(live.url + "/static/app.js").headers["content-type"].startswith(("text/javascript",
                                                                                     "application/javascript"))
    assert httpx.get(live.url + "/static/nope.js").status_code == 404
    assert httpx.get(live.url + "/static/..%2Fapp.py").status_code == 404
