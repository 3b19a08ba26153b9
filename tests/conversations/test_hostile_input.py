"""Hostile frames and parameters against a real daphne with a real websocket client.

Each refused frame gets an ``error`` frame naming what was wrong, nothing is stored,
the socket stays open (the next good frame works), and the server logs no traceback.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conversations.models import Message
from tests.conversations.test_real_server import SERVER_ENV, chat_token, open_socket, until

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
    assert not await asyncio.to_thread(Message.objects.exists)
    await still_works(ws)
    await ws.close()
    assert "Traceback" not in server_log(daphne_factory, base)
