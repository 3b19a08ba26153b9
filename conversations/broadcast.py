"""Channel-layer broadcasts of committed changes, for sync services.

A service calls these inside its transaction; the send happens after commit
(``transaction.on_commit``), so nobody hears of a row that was rolled back. A failed
send is logged and dropped: channel layers deliver at most once anyway, the
database is the truth and ``resume`` repairs what a socket missed.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

# Group of every socket that wants to hear about handoffs (the review console).
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
