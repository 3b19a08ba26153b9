"""The agents' socket on a real daphne with a real websocket client (the ``websockets`` package).

Across the network stack production uses: the session cookie of a signed-in agent,
the Origin check, close code 4403 for everyone else, and live frames from a
customer's socket (with Redis configured, through the Redis channel layer).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVER_ENV = {"SUPPORTBOT_REVIEW_SAMPLE_SHARE": "0", "SUPPORTBOT_PRELOAD_MODEL": "0"}


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)  # committed: the daphne process reads the same test database
    return client.cookies["sessionid"].value


def chat_token(base: str) -> str:
    request = urllib.request.Request(  # noqa: S310 - http URL of a local test server
        f"{base}/chat/session/", data=b"{}", headers={"Origin": base, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a local test server
        return json.loads(response.read())["token"]


async def recv_until(ws, predicate, timeout: float = 30.0) -> list[dict]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frames.append(json.loads(await ws.recv()))
            if predicate(frames[-1]):
                return frames


async def test_only_agents_open_the_socket_and_they_see_customers_waiting(daphne_factory, agent):
    base = daphne_factory(**SERVER_ENV)
    url = base.replace("http://", "ws://") + "/ws/agent/"

    # Anonymous, and a signed-in customer: told why, then closed with 4403.
    customer = await database_sync_to_async(UserFactory)(username="shopper")
    for cookie in ("", await database_sync_to_async(session_cookie)(customer)):
        headers = {"Cookie": f"sessionid={cookie}"} if cookie else {}
        async with connect(url, origin=base, additional_headers=headers, proxy=None, open_timeout=15) as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (error["type"], error["code"]) == ("error", "forbidden")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == 4403
    # A foreign Origin is refused at the handshake.
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin="http://evil.example", proxy=None, open_timeout=15)
    assert refused.value.response.status_code == 403

    cookie = await database_sync_to_async(session_cookie)(agent)
    async with connect(
        url, origin=base, additional_headers={"Cookie": f"sessionid={cookie}"}, proxy=None, open_timeout=15
    ) as agent_ws:
        hello = json.loads(await asyncio.wait_for(agent_ws.recv(), 10))
        assert (hello["type"], hello["agent"], hello["waiting"]) == ("hello", "Sam", 0)
        token = await asyncio.to_thread(chat_token, base)
        chat_url = base.replace("http://", "ws://") + f"/ws/chat/?token={token}"
        async with connect(chat_url, origin=base, proxy=None, open_timeout=15) as chat_ws:
            await asyncio.wait_for(chat_ws.recv(), 10)  # the conversation frame
            await chat_ws.send(json.dumps({"type": "request_human"}))
            frames = await recv_until(agent_ws, lambda f: f["type"] == "waiting")
            assert frames[-1]["count"] == 1
            assert any(f["type"] == "queue_item" and f["source"] == "handoff" for f in frames)
