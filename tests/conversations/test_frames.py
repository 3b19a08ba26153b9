"""Client frames are checked in one place before anything reads them (conversations/frames.py)."""

from __future__ import annotations

import json

import pytest

from conversations.frames import MAX_FRAME_DEPTH, client_echo, client_frame_parse, error_frame
from supportbot.errors import ApplicationError


def code_of(text) -> str:
    with pytest.raises(ApplicationError) as refused:
        client_frame_parse(text)
    return refused.value.code


def test_a_frame_is_a_json_object_with_a_string_type():
    assert client_frame_parse('{"type": "resume", "after": 0}') == {"type": "resume", "after": 0}
    assert code_of(None) == "bad_frame"
    assert code_of("nope") == "bad_json"
    assert code_of("[1]") == "bad_frame"
    assert code_of('{"type": 1}') == "bad_frame"


def test_nesting_is_limited_and_brackets_inside_strings_do_not_count():
    nested = "[" * MAX_FRAME_DEPTH + "]" * MAX_FRAME_DEPTH
    assert client_frame_parse(json.dumps({"type": "x"})[:-1] + f', "n": {nested[1:-1]}}}')["type"] == "x"
    assert code_of('{"type": "x", "n": ' + "[" * MAX_FRAME_DEPTH + "]" * MAX_FRAME_DEPTH + "}") == "bad_frame"
    text = "[[[{{{ \\" + '" ' * 10 + "]]]" * 5000
    assert client_frame_parse(json.dumps({"type": "message", "text": text}))["text"] == text
    # Unbalanced quotes and backslashes (text that tries to make the scan backtrack) are just bad JSON.
    assert code_of('"\\' * 30_000) == "bad_json"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"type": "message", "client_id": "c", "text": "a\\u0000b"}', "text"),
        ('{"type": "message", "client_id": "c", "text": "\\ud83d"}', "text"),
        ('{"type": "message", "client_id": "\\udfff", "text": "hi"}', "client_id"),
        ('{"type": "typ\\u0000e"}', "type"),
    ],
)
def test_text_that_cannot_be_stored_is_refused_by_field(raw, field):
    with pytest.raises(ApplicationError) as refused:
        client_frame_parse(raw)
    assert refused.value.code == "bad_frame"
    assert refused.value.extra["field"] == field


def test_a_surrogate_pair_is_one_ordinary_character():
    assert client_frame_parse('{"type": "message", "text": "\\ud83d\\ude00"}')["text"] == "\N{GRINNING FACE}"


def test_an_error_echoes_the_client_id_cut_to_the_longest_valid_one():
    assert client_echo({"type": "message", "client_id": "c-1"}) == {"client_id": "c-1"}
    assert client_echo({"type": "message", "client_id": 5}) == {}
    assert error_frame("bad_frame", "why", client_id="x" * 1000)["client_id"] == "x" * 64
