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
from tests.conversations.test_real_server import SERVER_ENV, ws_url

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
