"""The OpenAI-compatible request bodies (serve/schemas.py): strict types and OpenAI's bounds, unknown
fields ignored, `stop` as a string or a list of at most four, message content as text or parts."""

import pytest
from pydantic import ValidationError

from mtplab.serve.schemas import ChatRequest, CompletionRequest, Message


def test_a_minimal_body_gets_the_defaults_of_mtplab_generate():
    body = CompletionRequest(prompt="Ava has")
    assert (body.model, body.max_tokens, body.temperature, body.stream, body.speculative) == (None, None, None,
                                                                                            False, None)
    assert body.stop_strings() == [] and body.check_stop() is None


@pytest.mark.parametrize("field,value", [("max_tokens", "3"), ("max_tokens", True), ("temperature", "0.5"),
                                         ("stream", "yes"), ("seed", 1.0), ("speculative", 1)])
def test_types_are_strict(field, value):
    with pytest.raises(ValidationError) as err:
        CompletionRequest(prompt="x", **{field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", 2.01), ("temperature", -0.1),
                                         ("top_p", 0.0), ("top_p", 1.01), ("top_k", -1), ("seed", 2**63),
                                         ("n", 2), ("n_draft", -1), ("think_loops", 0), ("think_loops", 33)])
def test_values_out_of_bounds_are_refused(field, value):
    with pytest.raises(ValidationError) as err:
        CompletionRequest(prompt="x", **{field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_bounds_themselves_are_accepted():
    body = CompletionRequest(prompt=[1, 2], max_tokens=1, temperature=2.0, top_p=1.0, top_k=0, seed=2**63 - 1,
                             n=1, n_draft=0, think_loops=32)
    assert body.prompt == [1, 2] and body.seed == 2**63 - 1


def test_fields_openai_has_and_mtplab_does_not_use_are_ignored():
    body = ChatRequest(messages=[{"role": "user", "content": "hi", "extra": 1}], presence_penalty=0.5,
                       logprobs=True, user="someone")
    assert body.messages[0].text() == "hi" and not hasattr(body, "presence_penalty")


def test_stop_is_a_string_or_up_to_four_non_empty_strings():
    assert CompletionRequest(prompt="x", stop="\n").stop_strings() == ["\n"]
    assert CompletionRequest(prompt="x", stop=["a", "b"]).stop_strings() == ["a", "b"]
    assert CompletionRequest(prompt="x", stop=list("abcde")).check_stop() == "at most 4 stop strings, got 5"
    assert CompletionRequest(prompt="x", stop=["a", ""]).check_stop() == "stop strings must not be empty"
    assert CompletionRequest(prompt="x", stop=list("abcd")).check_stop() is None


def test_message_content_is_text_parts_or_nothing():
    parts = Message(role="user", content=[{"type": "text", "text": "Ava has "}, {"type": "text", "text": "3."}])
    assert parts.text() == "Ava has 3."
    assert Message(role="assistant", content=None).text() == ""
    with pytest.raises(ValidationError):
        Message(role="robot", content="hi")
    with pytest.raises(ValidationError):
        Message(role="user", content=[{"type": "image_url", "image_url": "x"}])
    with pytest.raises(ValidationError):
        ChatRequest(messages=[])  # at least one message
