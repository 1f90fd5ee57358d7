"""Decode events -> streamed pieces: one piece per event, draft marks, stop strings, finish reasons."""

import pytest

from mtplab.inference.generate import Event
from mtplab.inference.sampling import SamplingParams
from mtplab.serve.streaming import StopStrings, stream_pieces


class CharTokenizer:
    """Token id = a character's code point; enough to follow text through the pieces."""

    eos_id = 0

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def fake_decode(events):
    def run(model, prompt, max_new_tokens, params, eos_id, speculative, n_draft, stats, tree):
        yield from events
    return run


def ids(text):
    return [ord(c) for c in text]


def pieces(events, max_tokens=100, stop=()):
    return list(stream_pieces(None, CharTokenizer(), [1], max_tokens, SamplingParams(), stop=list(stop),
                              decode_fn=fake_decode(events)))


def test_a_block_of_tokens_is_one_piece_with_its_marks():
    # a speculative step: two accepted drafts and the computed token, in one event (one forward)
    out = pieces([Event(ids("a")), Event(ids("bcd"), [True, True, False], ids("bcx")),
                  Event(ids("e"), finished=True)], max_tokens=5)
    assert [p.text for p in out] == ["a", "bcd", "e"]
    assert out[1].segments == [("b", True), ("c", True), ("d", False)]
    assert out[1].drafts == ids("bcx")
    assert [p.tau for p in out] == [1.0, 2.0, pytest.approx(5 / 3)]
    assert [p.finish_reason for p in out] == [None, None, "length"]
    assert out[-1].completion_tokens == 5


def test_end_of_text_before_the_limit_is_stop():
    out = pieces([Event(ids("ab")), Event([], finished=True)], max_tokens=10)
    assert out[-1].finish_reason == "stop" and out[-1].text == "" and out[-1].completion_tokens == 2


def test_stop_string_across_tokens_is_cut_and_never_shown():
    events = [Event(ids("x ")), Event(ids("#"), [True]), Event(ids("#")), Event(ids("# 5")), Event(ids("z"))]
    out = pieces(events, stop=["###"])
    assert "".join(p.text for p in out) == "x "
    assert out[-1].finish_reason == "stop" and len(out) == 4  # decoding stops at the stop string
    assert all("#" not in p.text for p in out)


def test_held_back_text_that_is_not_a_stop_comes_out():
    out = pieces([Event(ids("a#")), Event(ids("#b")), Event(ids("c"), finished=True)], max_tokens=5,
                 stop=["###"])
    assert [p.text for p in out] == ["a", "##b", "c"]  # "a##" might have begun "###"
    assert out[-1].finish_reason == "length"


def test_stop_strings_unit():
    s = StopStrings(["ab", "xyz"])
    assert s.push([("1a", False)]) == ([("1", False)], False)
    assert s.push([("c", True)]) == ([("a", False), ("c", True)], False)
    assert s.push([("x", True), ("y", False)]) == ([], False)
    assert s.push([("q", False)]) == ([("x", True), ("y", False), ("q", False)], False)
    assert s.push([("zab", False)]) == ([("z", False)], True)
    assert StopStrings([]).push([("ab", False)]) == ([("ab", False)], False)


def test_a_decoder_without_a_finished_event_still_ends_the_stream():
    out = pieces([Event(ids("a#"))], stop=["#!"])
    assert [p.text for p in out] == ["a", "#"] and out[-1].finish_reason == "stop"
