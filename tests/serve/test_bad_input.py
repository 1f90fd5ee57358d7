"""Bad requests get a 4xx with an OpenAI-style error body, never a 5xx; the server keeps serving."""

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtplab.serve import create_app

COMPLETION = {"model": "tiny", "prompt": "Ava has", "max_tokens": 3}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Ava has 3 apples."}], "max_tokens": 3}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "seed", "stop", "stream", "n", "speculative", "n_draft", "stream_options"]


@pytest.fixture(scope="module")
def api(tiny):
    with TestClient(create_app(tiny[0], tiny[1], model_name="tiny"), raise_server_exceptions=False) as client:
        yield client


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ({**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ({**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ({**COMPLETION, "max_tokens": 10**30}, "max_tokens"),
    ({**COMPLETION, "max_tokens": 100_000}, "max_tokens"),  # beyond the context window
    ({**COMPLETION, "max_tokens": True}, "max_tokens"),
    ({**COMPLETION, "max_tokens": "3"}, "max_tokens"),
    ({**COMPLETION, "temperature": "hot"}, "temperature"),
    ({**COMPLETION, "temperature": 3}, "temperature"),
    ({**COMPLETION, "top_p": 0}, "top_p"),
    ({**COMPLETION, "top_k": -1}, "top_k"),
    ({**COMPLETION, "seed": -1}, "seed"),
    ({**COMPLETION, "n": 2}, "n"),
    ({**COMPLETION, "n_draft": 9}, "n_draft"),
    ({**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**COMPLETION, "stop": [""]}, "stop"),
    ({**COMPLETION, "prompt": 42}, "prompt"),
    ({**COMPLETION, "prompt": ""}, "prompt"),
    ({**COMPLETION, "prompt": [10**9]}, "prompt"),
    ({**COMPLETION, "prompt": ["a", "b"]}, "prompt"),
    ({**COMPLETION, "prompt": "Ava has 3 apples. " * 200}, "prompt"),  # longer than the context
    ({"model": "tiny", "max_tokens": 3}, "prompt"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content"),
    ({**CHAT, "messages": "hello"}, "messages"),
])
def test_bad_fields_name_the_parameter(api, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = assert_openai_error(api.post(path, json=body), 400)
    assert error["param"] == param or error["param"].startswith(param), error


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"temperature": 2, "top_p": 1e-300},
                                     {"temperature": 1e-30, "top_p": 5e-324, "top_k": 10**12},
                                     {"temperature": 2, "seed": 2**63 - 1}])
def test_extreme_but_valid_sampling_is_served(api, extreme):
    r = api.post("/v1/completions", json={**COMPLETION, **extreme})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_malformed_bodies(api):
    headers = {"content-type": "application/json"}
    assert_openai_error(api.post("/v1/completions", content=b"{bad json", headers=headers), 400)
    assert_openai_error(api.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_openai_error(api.post("/v1/completions", content=b"", headers=headers), 400)
    assert_openai_error(api.post("/v1/chat/completions", content=b"\xff\xfe", headers=headers), 400)


SURROGATE = "\ud800"  # a lone UTF-16 surrogate: JSON can write it, UTF-8 cannot


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, param", [
    ({**COMPLETION, "prompt": SURROGATE}, "prompt"),
    ({**COMPLETION, "prompt": ["Ava \udfff has"]}, "prompt.0"),
    ({**COMPLETION, "stop": SURROGATE}, "stop"),
    ({**COMPLETION, "stop": ["\n", SURROGATE]}, "stop.1"),
    ({**CHAT, "messages": [{"role": "user", "content": "Ava" + SURROGATE}]}, "messages.0.content"),
    ({**CHAT, "messages": [{"role": "system", "content": SURROGATE}, {"role": "user", "content": "hi"}]},
     "messages.0.content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Ava"},
                                                        {"type": "text", "text": "\udc00"}]}]},
     "messages.0.content.1.text"),
])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(api, body, param, stream):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = api.post(path, content=json.dumps({**body, "stream": stream}), headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400)
    assert error["param"] == param and "surrogate" in error["message"], error


@pytest.mark.parametrize("name", ["a" * 300, "a" * 5000, "..%2Fapp.py", "%2e%2e/app.py", ".hidden", "app.js%00",
                                  "nope.js", "app.js/x", "%ff%fe", "static/app.js"])
def test_any_other_static_path_is_a_404(api, name):
    assert_openai_error(api.get("/static/" + name), 404)


def test_head_works_where_get_does_and_trailing_slashes(api):
    for path in ["/health", "/health/", "/v1/models", "/v1/models/", "/v1/models/tiny", "/", "/static/app.js"]:
        got, head = api.get(path, follow_redirects=False), api.head(path, follow_redirects=False)
        assert got.status_code == head.status_code == 200, path
        assert head.content == b"" and got.content
    assert api.get("/health/", follow_redirects=False).json()["status"] == "ok"


def test_an_unexpected_error_is_a_json_500_that_closes_the_connection(live, tiny, monkeypatch):
    """A bug (here: the tokenizer failing) is a 500 in OpenAI's shape with `Connection: close`; the
    client's next request, on a fresh connection, is served."""
    encode = tiny[1].encode

    def failing(text, *args, **kwargs):
        if text == "boom":
            raise RuntimeError("a bug")
        return encode(text, *args, **kwargs)
    monkeypatch.setattr(tiny[1], "encode", failing)
    with httpx.Client(base_url=live.url, timeout=10) as h:
        r = h.post("/v1/completions", json={**COMPLETION, "prompt": "boom"})
        assert r.status_code == 500 and r.headers["connection"] == "close"
        assert r.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                     "param": None, "code": None}
        r = h.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_unknown_model_route_and_method(api):
    error = assert_openai_error(api.post("/v1/completions", json={**COMPLETION, "model": "gpt-4o"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert_openai_error(api.get("/v1/models/gpt-4o"), 404)
    assert_openai_error(api.get("/v1/nope"), 404)
    assert_openai_error(api.get("/v1/completions"), 405)


def test_context_overflow_has_its_code(api):
    error = assert_openai_error(api.post("/v1/completions", json={**COMPLETION, "prompt": "Ava " * 400}), 400)
    assert error["code"] == "context_length_exceeded" and "context" in error["message"]


def test_missing_or_wrong_key(tiny):
    app = create_app(tiny[0], tiny[1], model_name="tiny", api_key="k1")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        for headers in [{}, {"Authorization": "Bearer k2"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"},
                        {"Authorization": "Bearer k1x"}, {"Authorization": "Bearer \xc3\xa9".encode("latin-1")}]:
            error = assert_openai_error(client.post("/v1/completions", json=COMPLETION, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        # the key is checked first: a bad body or an unknown route without it says only "401"
        assert_openai_error(client.post("/v1/completions", content=b"{bad"), 401)
        assert_openai_error(client.get("/v1/nope"), 401)
        assert client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer k1"}).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
overrides = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=4)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       base=st.sampled_from([COMPLETION, CHAT, {}]), changes=overrides)
def test_generated_bad_requests_never_5xx(api, route, base, changes):
    body = {**base, **changes}
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep the valid ones quick; huge values are covered above
    r = api.post(route, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)
    elif not body.get("stream"):
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@settings(max_examples=30, deadline=None, database=None)
@given(raw=st.binary(max_size=64))
def test_generated_raw_bodies_never_5xx(api, raw):
    r = api.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (raw, r.text)


# any code point, lone surrogates included (JSON writes them as \\udXXX escapes)
any_text = st.text(st.characters(exclude_categories=()), max_size=24)
text_fields = st.one_of(
    st.builds(lambda t: ("/v1/completions", {"prompt": t}), any_text),
    st.builds(lambda t: ("/v1/completions", {"prompt": [t]}), any_text),
    st.builds(lambda t, u: ("/v1/completions", {"prompt": "Ava has", "stop": [t, u]}), any_text, any_text),
    st.builds(lambda t: ("/v1/completions", {"prompt": "Ava has", "model": t}), any_text),
    st.builds(lambda t, role: ("/v1/chat/completions", {"messages": [{"role": role, "content": t}]}),
              any_text, st.sampled_from(["system", "developer", "user", "assistant"])),
    st.builds(lambda ts: ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": t} for t in ts]}]}), st.lists(any_text, max_size=3)),
)


@pytest.fixture(scope="module")
def greedy(tiny):
    import mtplab
    return mtplab.generate(tiny[0], tiny[1], COMPLETION["prompt"], max_new_tokens=COMPLETION["max_tokens"])


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=text_fields, stream=st.booleans())
def test_generated_text_in_any_unicode_never_5xx(api, greedy, case, stream):
    route, body = case
    r = api.post(route, content=json.dumps({"max_tokens": 2, **body, "stream": stream}),
                 headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)
    if "model" not in body and any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(body, ensure_ascii=False)):
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (body, r.text)
    after = api.post("/v1/completions", json=COMPLETION)  # and the next request is served right
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == greedy


def test_still_serving_after_all_that(api):
    r = api.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
