"""The chat's use of the Redis channel layer under stress, on real daphne processes and real Redis servers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
from channels.db import database_sync_to_async
from websockets.asyncio.client import connect

from conversations.models import Conversation
from conversations.tokens import chat_token_mint
from supportbot.channel_layer import RedisChannelLayer
from tests.conftest import free_port
from tests.conversations.test_real_server import SERVER_ENV, chat_token, is_done, open_socket, until, ws_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SOCKETS = 500


def groups_with_members(url: str, conversations) -> int:
    """How many of the conversations' channel-layer groups have members (an emptied group's key is gone)."""
    client = redis.Redis.from_url(url)
    return client.exists(*(f"asgi:group:{conversation.group_name}" for conversation in conversations))


async def test_500_sockets_closing_at_once_leave_their_groups_without_errors(daphne_factory, redis_url):
    keys = [f"mass{n:036d}" for n in range(SOCKETS)]
    conversations = await database_sync_to_async(Conversation.objects.bulk_create)(
        [Conversation(session_key=key) for key in keys]
    )
    base = daphne_factory(**SERVER_ENV)

    opening = asyncio.Semaphore(50)

    async def open_one(key: str):
        async with opening:
            ws = await connect(ws_url(base, chat_token_mint(session_key=key)), origin=base, proxy=None, open_timeout=60)
            hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert hello["id"], hello  # in its conversation's group
            return ws

    sockets = await asyncio.gather(*(open_one(key) for key in keys))
    assert await asyncio.to_thread(groups_with_members, redis_url, conversations) == SOCKETS

    await asyncio.gather(*(ws.close() for ws in sockets))
    # Every socket leaves its group (an emptied group's key disappears).
    deadline = time.monotonic() + 120
    while (
        left := await asyncio.to_thread(groups_with_members, redis_url, conversations)
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    log = daphne_factory.processes[base].log_path.read_text()
    assert "MaxConnectionsError" not in log
    assert "Traceback" not in log
    assert left == 0


async def test_leaving_a_group_never_raises_even_without_redis(caplog):
    port = free_port()  # nothing listens there
    layer = RedisChannelLayer(hosts=[f"redis://127.0.0.1:{port}/0"], pool_timeout=1)
    await layer.group_discard("conversation.x", "specific.abc!def")  # logged, not raised
    assert "Could not remove specific.abc!def from group conversation.x" in caplog.text
    await layer.close_pools()


async def test_chat_rides_out_a_redis_restart(daphne_factory, served_model, redis_server):
    """Redis crashes and comes back empty: sockets stay open, replies still arrive, groups are rejoined."""
    env = {**SERVER_ENV, "REDIS_URL": redis_server.url}
    first, second = daphne_factory(**env), daphne_factory(**env)
    token = await asyncio.to_thread(chat_token, first)
    tab_a, _ = await open_socket(first, token)
    await tab_a.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    started = (await until(tab_a, is_done))[0]
    tab_b, hello_b = await open_socket(second, token)  # the same customer in another process
    assert hello_b["id"] == started["id"]

    redis_server.kill()
    # During the outage a question is still saved and answered (straight to the asking socket).
    await tab_a.send(json.dumps({"type": "message", "client_id": "c-2", "text": "How do I reset my password?"}))
    during = await until(tab_a, is_done, timeout=90)
    assert any(f.get("client_id") == "c-2" for f in during)
    assert during[-1]["status"] == "complete"
    # A socket opened during the outage works too (on the database alone).
    tab_c, hello_c = await open_socket(second, token)
    assert hello_c["id"] == started["id"]

    redis_server.start()  # empty: every group membership is gone
    # The sockets were kept and their processes rejoin their groups: what one tab asks
    # reaches the other tabs in the other process again.
    deadline = time.monotonic() + 90
    n = 0
    while True:
        n += 1
        await tab_a.send(json.dumps({"type": "message", "client_id": f"c-after-{n}", "text": "I want a refund."}))
        await until(tab_a, is_done, timeout=90)
        try:
            seen = await until(tab_b, lambda f, n=n: f.get("client_id") == f"c-after-{n}", timeout=5)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the other process never rejoined its groups"
    assert seen[-1]["body"] == "I want a refund."
    assert (await until(tab_c, is_done))[-1]["status"] == "complete"
    # A socket opened after the restart gets its reply.
    tab_d, _ = await open_socket(first, await asyncio.to_thread(chat_token, first))
    await tab_d.send(json.dumps({"type": "message", "client_id": "d-1", "text": "Can I change my address?"}))
    assert (await until(tab_d, is_done))[-1]["status"] == "complete"

    for ws in (tab_a, tab_b, tab_c, tab_d):
        assert ws.close_code is None  # none was closed
        await ws.close()
    for base in (first, second):
        log = daphne_factory.processes[base].log_path.read_text()
        assert "Exception inside application" not in log


async def test_the_layer_waits_out_a_redis_restart_and_rejoins_its_groups(redis_server):
    layer = RedisChannelLayer(hosts=[redis_server.url], retry_max=0.5)
    channel = await layer.new_channel()
    await layer.group_add("conversation.x", channel)
    receiving = asyncio.create_task(layer.receive(channel))
    await layer.group_send("conversation.x", {"type": "chat.before"})
    assert (await asyncio.wait_for(receiving, 30))["type"] == "chat.before"

    receiving = asyncio.create_task(layer.receive(channel))
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        await layer.group_send("conversation.x", {"type": "chat.lost"})  # senders are told
    await layer.group_add("conversation.y", channel)  # remembered, not raised
    redis_server.start()  # empty
    deadline = time.monotonic() + 60
    while not receiving.done():  # the receive never failed; it is answered once the groups are back
        assert time.monotonic() < deadline, "the channel never got back into its group"
        await layer.group_send("conversation.y", {"type": "chat.after"})
        await asyncio.sleep(0.2)
    assert (await receiving)["type"] == "chat.after"
    await layer.close_pools()
