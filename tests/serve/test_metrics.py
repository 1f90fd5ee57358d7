"""GET /metrics (Prometheus text, parsed by prometheus_client's own parser) moves with the
requests a test makes; one access-log line per request, without the prompt or the key."""

import json
import logging
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from mtplab.serve import create_app

PROMPT = "Ava has 3 apples. Then Ava buys 2 more apples."


def scrape(server, key=None) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    parser = pytest.importorskip("prometheus_client.parser")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    r = httpx.get(server.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(r.text) for s in family.samples}


def requests(samples, route, status) -> float:
    return samples.get(("mtplab_requests_total", (("route", route), ("status", status))), 0.0)


def by_position(samples, name) -> dict[str, float]:
    return {dict(labels)["position"]: v for (n, labels), v in samples.items() if n == name}


def test_metrics_move_with_the_requests(serve_app, caplog):
    pytest.importorskip("prometheus_client")
    caplog.set_level(logging.INFO, logger="mtplab.serve.access")
    server = serve_app(api_key="sekret")
    auth = {"Authorization": "Bearer sekret"}
    before = scrape(server, "sekret")
    assert before[("mtplab_generated_tokens_total", ())] == 0 and before[("mtplab_queue_depth", ())] == 0
    answer = httpx.post(server.url + "/v1/completions", headers=auth, timeout=30,
                        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12}).json()
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=auth, timeout=30,
                      json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
                            "stream": True}) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert httpx.post(server.url + "/v1/completions", headers=auth, json={"prompt": ""}).status_code == 400
    assert httpx.get(server.url + "/v1/nope", headers=auth).status_code == 404
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401  # the key guards the metrics too

    after = scrape(server, "sekret")
    assert requests(after, "/v1/completions", "200") == 1 and requests(after, "/v1/completions", "400") == 1
    assert requests(after, "/v1/chat/completions", "200") == 1
    assert requests(after, "other", "404") == 1 and requests(after, "/v1/models", "401") == 1
    assert requests(after, "/metrics", "200") == 1  # the first scrape
    streamed = [json.loads(c[len("data: "):]) for c in chunks]
    usage = next(c["usage"] for c in streamed if c.get("usage"))
    generated = answer["usage"]["completion_tokens"] + usage["completion_tokens"]
    assert after[("mtplab_generated_tokens_total", ())] == generated
    forwards = after[("mtplab_decode_forwards_total", ())]
    assert 0 < forwards <= generated  # tau = tokens / forwards >= 1
    assert after[("mtplab_tau_count", ())] == 2 and after[("mtplab_time_to_first_token_seconds_count", ())] == 2
    assert after[("mtplab_token_latency_seconds_count", ())] >= 1
    accepted = answer["mtplab"]["accepted_tokens"] + sum(sum(c.get("mtplab", {}).get("accepted", []))
                                                         for c in streamed)  # the first chunk has none
    assert sum(by_position(after, "mtplab_draft_accepted_total").values()) == accepted
    proposed = by_position(after, "mtplab_draft_proposed_total")
    assert proposed and all(proposed[p] >= v for p, v in by_position(after, "mtplab_draft_accepted_total").items())
    assert after[("mtplab_active_requests", ())] == 0 and after[("mtplab_http_requests_in_flight", ())] == 1

    lines = [r.getMessage() for r in caplog.records if r.name == "mtplab.serve.access"]
    assert f"POST /v1/completions 200 tokens={answer['usage']['completion_tokens']} " in "\n".join(lines)
    assert f"POST /v1/chat/completions 200 tokens={usage['completion_tokens']} " in "\n".join(lines)
    assert any(line.startswith("GET /v1/models 401 tokens=0 ") for line in lines)
    assert not any("Ava" in line or "sekret" in line for line in lines)  # never the prompt, never the key


def test_without_prometheus_client_the_server_runs(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with TestClient(create_app(tiny[0], tiny[1], model_name="tiny")) as client:
        r = client.get("/metrics")
        assert r.status_code == 404 and "prometheus_client" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "Ava has", "max_tokens": 3})
        assert r.status_code == 200
