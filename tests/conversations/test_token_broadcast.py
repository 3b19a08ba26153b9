"""Token copies to a conversation's other sockets: only while one watches, batched, in order, never
holding up the stream."""

from __future__ import annotations

import asyncio
import uuid

from channels.layers import InMemoryChannelLayer

from conversations import replies
from conversations.broadcast import group_has_other_members


class SlowLayer(InMemoryChannelLayer):
    """A real in-memory layer whose group_send takes a while, like Redis under load."""

    def __init__(self, delay: float, fail: bool = False):
        super().__init__()
        self.delay, self.fail, self.sends = delay, fail, 0

    async def group_send(self, group, message):
        self.sends += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("layer down")
        await super().group_send(group, message)


def token(seq: int) -> dict:
    return {"type": "token", "id": 1, "delta": f"w{seq} ", "seq": seq}


async def received(layer, channel) -> list[dict]:
    events = []
    while True:
        try:
            events.append(await asyncio.wait_for(layer.receive(channel), 0.05))
        except TimeoutError:
            return events


async def test_tokens_that_pile_up_leave_together_in_order(monkeypatch):
    layer = SlowLayer(delay=0.02)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    channel = await layer.new_channel()
    await layer.group_add("conversation.x", channel)
    copies = replies._TokenBroadcast("conversation.x", origin="asker", interval=0)
    for seq in range(1, 31):  # a word every 2 ms; each send takes 20 ms
        copies.add(token(seq))
        await asyncio.sleep(0.002)
    await copies.drain()
    events = await received(layer, channel)
    assert {e["type"] for e in events} == {"chat.tokens"}
    assert {e["origin"] for e in events} == {"asker"}
    assert [f["seq"] for e in events for f in e["frames"]] == list(range(1, 31))
    assert len(events) == layer.sends < 10  # far fewer sends than tokens


async def test_the_first_copy_leaves_at_once_the_rest_after_the_interval_or_at_drain(monkeypatch):
    layer = SlowLayer(delay=0)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    channel = await layer.new_channel()
    await layer.group_add("conversation.i", channel)
    copies = replies._TokenBroadcast("conversation.i", origin="asker", interval=30.0)
    copies.add(token(1))
    await asyncio.sleep(0.05)
    for seq in range(2, 6):
        copies.add(token(seq))
    await asyncio.sleep(0.05)
    assert [len(e["frames"]) for e in await received(layer, channel)] == [1]  # the rest wait for the interval
    loop = asyncio.get_running_loop()
    started = loop.time()
    await copies.drain()
    assert loop.time() - started < 5  # drain sends at once, it does not wait out the 30 s
    assert [f["seq"] for e in await received(layer, channel) for f in e["frames"]] == [2, 3, 4, 5]


async def test_drain_waits_for_the_last_copy_and_a_dead_layer_loses_only_copies(monkeypatch, caplog):
    layer = SlowLayer(delay=0.01, fail=True)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    await layer.group_add("conversation.y", await layer.new_channel())
    copies = replies._TokenBroadcast("conversation.y", origin="asker")
    for seq in range(1, 4):
        copies.add(token(seq))
    await copies.drain()
    assert copies.task.done()
    assert not copies.pending
    assert "Broadcasting 3 token(s) to conversation.y failed" in caplog.text


async def test_drain_gives_up_after_its_timeout(monkeypatch, caplog):
    layer = SlowLayer(delay=5.0)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    await layer.group_add("conversation.z", await layer.new_channel())
    copies = replies._TokenBroadcast("conversation.z", origin="asker")
    copies.add(token(1))
    await copies.drain(timeout=0.05)
    await asyncio.sleep(0)
    assert copies.task.cancelled()
    assert "still unsent" in caplog.text


async def test_nothing_is_copied_while_only_the_asking_socket_is_there(monkeypatch):
    layer = SlowLayer(delay=0)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    await layer.group_add("conversation.alone", "asker")
    copies = replies._TokenBroadcast("conversation.alone", origin="asker", interval=0, recheck=0.05)
    for seq in range(1, 11):
        copies.add(token(seq))
        await asyncio.sleep(0.02)
    await copies.drain()
    assert layer.sends == 0
    assert not copies.pending
    assert copies.task.done()


async def test_a_socket_that_joins_mid_reply_gets_every_token(monkeypatch):
    layer = SlowLayer(delay=0)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    await layer.group_add("conversation.late", "asker")
    copies = replies._TokenBroadcast("conversation.late", origin="asker", interval=0, recheck=0.1)
    for seq in range(1, 4):
        copies.add(token(seq))
    await asyncio.sleep(0.05)
    assert layer.sends == 0  # nobody else yet
    tab = await layer.new_channel()
    await layer.group_add("conversation.late", tab)
    for seq in range(4, 7):
        copies.add(token(seq))
        await asyncio.sleep(0.1)
    copies.add(token(7))
    await copies.drain()
    assert [f["seq"] for e in await received(layer, tab) for f in e["frames"]] == list(range(1, 8))


async def test_group_members_are_read_from_redis(redis_url):
    from channels_redis.core import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[redis_url], prefix=f"test-{uuid.uuid4().hex}")
    group = "conversation.members"
    try:
        assert await group_has_other_members(layer, group, "asker") is False
        await layer.group_add(group, "asker")
        assert await group_has_other_members(layer, group, "asker") is False
        await layer.group_add(group, "tab2")
        assert await group_has_other_members(layer, group, "asker") is True
        await layer.group_discard(group, "tab2")
        assert await group_has_other_members(layer, group, "asker") is False
    finally:
        await layer.flush()
        await layer.close_pools()


async def test_a_layer_that_cannot_say_counts_as_watched():
    class OtherLayer:
        pass

    assert await group_has_other_members(OtherLayer(), "conversation.q", "asker") is True
