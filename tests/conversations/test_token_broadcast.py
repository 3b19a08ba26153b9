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


GROUP = "conversation.t"


async def broadcast_on(monkeypatch, *, members=("watcher",), delay=0.0, fail=False, **options):
    """A SlowLayer in place of the project's layer, ``GROUP`` holding ``members``, and the copier of "asker"."""
    layer = SlowLayer(delay=delay, fail=fail)
    monkeypatch.setattr(replies, "get_channel_layer", lambda: layer)
    for member in members:
        await layer.group_add(GROUP, member)
    return layer, replies._TokenBroadcast(GROUP, origin="asker", **options)


async def received(layer, channel) -> list[dict]:
    events = []
    while True:
        try:
            events.append(await asyncio.wait_for(layer.receive(channel), 0.05))
        except TimeoutError:
            return events


async def test_tokens_that_pile_up_leave_together_in_order(monkeypatch):
    layer, copies = await broadcast_on(monkeypatch, delay=0.02, interval=0)
    for seq in range(1, 31):  # a word every 2 ms; each send takes 20 ms
        copies.add(token(seq))
        await asyncio.sleep(0.002)
    await copies.drain()
    events = await received(layer, "watcher")
    assert {e["type"] for e in events} == {"chat.tokens"}
    assert {e["origin"] for e in events} == {"asker"}
    assert [f["seq"] for e in events for f in e["frames"]] == list(range(1, 31))
    assert len(events) == layer.sends < 10  # far fewer sends than tokens


async def test_the_first_copy_leaves_at_once_the_rest_after_the_interval_or_at_drain(monkeypatch):
    layer, copies = await broadcast_on(monkeypatch, interval=30.0)
    copies.add(token(1))
    await asyncio.sleep(0.05)
    for seq in range(2, 6):
        copies.add(token(seq))
    await asyncio.sleep(0.05)
    assert [len(e["frames"]) for e in await received(layer, "watcher")] == [1]  # the rest wait for the interval
    loop = asyncio.get_running_loop()
    started = loop.time()
    await copies.drain()
    assert loop.time() - started < 5  # drain sends at once, it does not wait out the 30 s
    assert [f["seq"] for e in await received(layer, "watcher") for f in e["frames"]] == [2, 3, 4, 5]


async def test_drain_waits_for_the_last_copy_and_a_dead_layer_loses_only_copies(monkeypatch, caplog):
    _, copies = await broadcast_on(monkeypatch, delay=0.01, fail=True)
    for seq in range(1, 4):
        copies.add(token(seq))
    await copies.drain()
    assert copies.task.done()
    assert not copies.pending
    assert f"Copying tokens to {GROUP} failed" in caplog.text
    copies.add(token(4))  # the rest of the reply is not tried again (and not logged again)
    assert not copies.pending
    assert caplog.text.count("Copying tokens") == 1


async def test_drain_gives_up_after_its_timeout(monkeypatch, caplog):
    _, copies = await broadcast_on(monkeypatch, delay=5.0)
    copies.add(token(1))
    await copies.drain(timeout=0.05)
    await asyncio.sleep(0)
    assert copies.task.cancelled()
    assert "still unsent" in caplog.text


async def test_nothing_is_copied_while_only_the_asking_socket_is_there(monkeypatch):
    layer, copies = await broadcast_on(monkeypatch, members=["asker"], interval=0, recheck=0.05)
    for seq in range(1, 11):
        copies.add(token(seq))
        await asyncio.sleep(0.02)
    await copies.drain()
    assert layer.sends == 0
    assert not copies.pending
    assert copies.task.done()


async def test_a_socket_that_joins_mid_reply_gets_every_token(monkeypatch):
    layer, copies = await broadcast_on(monkeypatch, members=["asker"], interval=0, recheck=0.1)
    for seq in range(1, 4):
        copies.add(token(seq))
    await asyncio.sleep(0.05)
    assert layer.sends == 0  # nobody else yet
    await layer.group_add(GROUP, "tab")
    for seq in range(4, 7):
        copies.add(token(seq))
        await asyncio.sleep(0.1)
    copies.add(token(7))
    await copies.drain()
    assert [f["seq"] for e in await received(layer, "tab") for f in e["frames"]] == list(range(1, 8))


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
