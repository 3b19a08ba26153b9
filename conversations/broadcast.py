"""Channel-layer broadcasts of committed changes, for sync services.

A service calls these inside its transaction; the send happens after commit
(``transaction.on_commit``), so nobody hears of a row that was rolled back. A failed
send is logged and dropped: channel layers deliver at most once anyway, the
database is the truth and ``resume`` repairs what a socket missed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

# Group of every agents' workspace socket: handoffs, queue changes, the waiting count.
AGENTS_GROUP = "agents"


def group_send_now(group: str, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, event)
    except Exception:  # noqa: BLE001 - a lost broadcast must not undo a committed change
        log.warning("Broadcast of %s to %s failed", event.get("type"), group, exc_info=True)


def group_send_on_commit(group: str, event: dict[str, Any]) -> None:
    transaction.on_commit(lambda: group_send_now(group, event))


async def group_has_other_members(layer: Any, group: str, channel: str) -> bool:
    """Whether a channel other than ``channel`` is in ``group``; True when the layer cannot say.

    Asks the two layers this project runs on for their member lists (the channels-redis
    sorted set, as its own ``group_send`` reads it; the in-memory layer's dict). Any
    other layer, or an error, answers True: the caller then sends, as it would anyway.
    """
    try:
        from channels_redis.core import RedisChannelLayer

        if isinstance(layer, RedisChannelLayer):
            connection = layer.connection(layer.consistent_hash(group))
            members = await connection.zrangebyscore(
                layer._group_key(group), min=int(time.time()) - layer.group_expiry, max="+inf"
            )
            return any(member.decode() != channel for member in members)
    except Exception:  # noqa: BLE001 - unknown is "yes": a wasted send, never a missed one
        log.warning("Could not read the members of group %s", group, exc_info=True)
        return True
    groups = getattr(layer, "groups", None)
    if isinstance(groups, dict):
        return any(member != channel for member in groups.get(group, {}))
    return True
