"""Hostile frames and parameters against a real daphne with a real websocket client.

Each refused frame gets an ``error`` frame naming what was wrong, nothing is stored,
the socket stays open (the next good frame works), and the server logs no traceback.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conversations.models import Conversation, Message
from tests.conftest import free_port
from tests.conversations.test_real_server import SERVER_ENV, chat_token, health, open_socket, until, ws_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


async def refused(ws, raw: str) -> dict:
    await ws.send(raw)
    frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
    assert frame["type"] == "error", frame
    return frame


async def still_works(ws, client_id: str = "ok") -> None:
    await ws.send(json.dumps({"type": "message", "client_id": client_id, "text": "Where is my order?"}))
    ack = (await until(ws, lambda f: f["type"] in {"message", "error"} and f.get("client_id") == client_id))[-1]
    assert (ack["type"], ack["role"]) == ("message", "customer"), ack


def server_log(daphne_factory, base: str) -> str:
    return daphne_factory.processes[base].log_path.read_text()


async def test_deeply_nested_json_is_refused_and_the_socket_stays_open(daphne_factory):
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    for raw in (
        "[" * 30_000 + "]" * 30_000,
        '{"a":' * 6_000 + "1" + "}" * 6_000,
        # Deep inside an otherwise valid message frame.
        '{"type": "message", "client_id": "n-1", "text": "hi", "x": ' + "[" * 20_000 + "]" * 20_000 + "}",
    ):
        error = await refused(ws, raw)
        assert error["code"] == "bad_frame"
        assert "nested" in error["message"]
    assert not await database_sync_to_async(Message.objects.exists)()
    await still_works(ws)
    await ws.close()
    assert "Traceback" not in server_log(daphne_factory, base)


async def test_nul_and_unpaired_surrogates_are_refused_by_field(daphne_factory):
    base = daphne_factory(**SERVER_ENV)
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    for field, frame in (
        ("text", '{"type": "message", "client_id": "c-nul", "text": "hi\\u0000there"}'),
        ("text", '{"type": "message", "client_id": "c-hi", "text": "hi \\ud800"}'),
        ("text", '{"type": "message", "client_id": "c-lo", "text": "\\udc00 hi"}'),
        ("client_id", '{"type": "message", "client_id": "c\\u0000", "text": "hi"}'),
        ("client_id", '{"type": "message", "client_id": "c\\udc00", "text": "hi"}'),
    ):
        error = await refused(ws, frame)
        assert (error["code"], error["field"]) == ("bad_frame", field), error
        assert f"'{field}'" in error["message"]
    assert not await database_sync_to_async(Message.objects.exists)()
    assert not await database_sync_to_async(Conversation.objects.exists)()
    await still_works(ws)
    await ws.close()

    # A NUL in a query parameter: the socket opens, the parameter is refused by name and
    # ignored, and the conversation starts without it.
    ws, hello = await open_socket(base, token, query="segment=pro%00&page=https://shop.example/%00")
    assert hello["type"] == "conversation"
    errors = [json.loads(await asyncio.wait_for(ws.recv(), 15)) for _ in range(2)]
    assert {(e["code"], e["field"]) for e in errors} == {("bad_parameter", "segment"), ("bad_parameter", "page")}
    await still_works(ws, "ok-2")
    conversation = await database_sync_to_async(Conversation.objects.get)()
    assert (conversation.segment, conversation.metadata["page"]) == ("", "")
    await ws.close()
    assert "Traceback" not in server_log(daphne_factory, base)


async def test_text_of_invisible_characters_is_refused_as_empty(daphne_factory, served_model):
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    for n, text in enumerate(
        (
            "\u200b\u200c\u200d\ufeff",  # zero-width space, non-joiner, joiner, byte-order mark
            "\u2060\u00ad\u034f\ufe0f",  # word joiner, soft hyphen, grapheme joiner, variation selector
            " \u3164\u2800\u115f\t\u180e ",  # Hangul filler, Braille blank, Hangul choseong filler, tab
            "\u202e\u2066\u2069\U000e0041",  # bidi controls, a tag character
        )
    ):
        error = await refused(ws, json.dumps({"type": "message", "client_id": f"e-{n}", "text": text}))
        assert (error["code"], error["client_id"]) == ("empty", f"e-{n}"), error
    assert not await database_sync_to_async(Message.objects.exists)()

    # Text is kept in NFC form, trimmed of invisible edges; joiners inside an emoji stay.
    text = "\u200b Cafe\u0301 \U0001f469\u200d\U0001f4bb\u200b"
    await ws.send(json.dumps({"type": "message", "client_id": "nfc", "text": text}))
    ack = (await until(ws, lambda f: f.get("client_id") == "nfc"))[-1]
    assert ack["body"] == "Caf\u00e9 \U0001f469\u200d\U0001f4bb"
    await until(ws, lambda f: f["type"] == "reply_done")
    await ws.close()


async def test_errors_on_a_message_echo_its_client_id(daphne_factory):
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    long_id = "x" * 100
    for frame, code, echoed in (
        ({"type": "message", "client_id": "   ", "text": "hi"}, "bad_frame", "   "),
        ({"type": "message", "client_id": long_id, "text": "hi"}, "bad_frame", long_id[:64]),
        ({"type": "message", "client_id": "c-1", "text": 5}, "bad_frame", "c-1"),
        ({"type": "message", "client_id": "c-2", "text": "hi\x00"}, "bad_frame", "c-2"),
        ({"type": "message", "client_id": "c-3", "text": ""}, "empty", "c-3"),
    ):
        error = await refused(ws, json.dumps(frame))
        assert (error["code"], error.get("client_id")) == (code, echoed), error
    assert not await database_sync_to_async(Message.objects.exists)()
    await still_works(ws)
    await ws.close()


async def test_a_websocket_to_an_unknown_path_is_refused_plainly(daphne_factory):
    base = daphne_factory(**SERVER_ENV)
    token = await asyncio.to_thread(chat_token, base)
    for path in ("/ws/chat/not-a-uuid/", "/ws/nope/", "/"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(base, token, path), origin=base, proxy=None, open_timeout=15)
        assert refused.value.response.status_code == 403, path
    ws, hello = await open_socket(base, token)  # the server is fine
    assert hello["type"] == "conversation"
    await ws.close()
    log = server_log(daphne_factory, base)
    assert "Traceback" not in log
    assert "No route found" not in log


def test_healthz_during_a_redis_outage_names_no_host_to_anonymous_callers(daphne_factory):
    port = free_port()  # nothing listens there: Redis is down
    down = {**SERVER_ENV, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    report = health(daphne_factory(**down))
    assert report["status"] == "unavailable"
    assert report["checks"]["channel_layer"]["ok"] is False
    assert str(port) not in json.dumps(report)
    detailed = health(daphne_factory(**down, SUPPORTBOT_HEALTHZ_DETAILS="1"))
    assert f"127.0.0.1:{port}" in json.dumps(detailed)
