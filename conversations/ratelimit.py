"""Per-session rate limit of chat frames, shared by every socket of the session.

A fixed one-minute window counted in Redis (``INCR`` + ``EXPIRE``) when
``REDIS_URL`` is set, so all sockets in all daphne processes share the budget;
an in-process counter otherwise (the laptop demo runs one process). If Redis
does not answer, frames are let through and a warning is logged: the chat keeps
working and the channel layer, on the same Redis, is failing loudly anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from django.conf import settings

log = logging.getLogger(__name__)

WINDOW_S = 60
_KEY_PREFIX = "supportbot:ratelimit"
_local_counts: dict[tuple[str, int], int] = {}
# redis.asyncio clients hold connections bound to the event loop that made them.
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _redis():
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        _clients[loop] = client
    return client


async def _count_redis(key: str, window: int) -> int | None:
    import redis

    name = f"{_KEY_PREFIX}:{key}:{window}"
    try:
        async with _redis().pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.expire(name, WINDOW_S + 5)
            count, _ = await pipe.execute()
    except (redis.RedisError, OSError):
        log.warning("Rate limit not applied: Redis did not answer", exc_info=True)
        return None
    return int(count)


def _count_local(key: str, window: int) -> int:
    for stale in [k for k in _local_counts if k[1] < window]:
        del _local_counts[stale]
    _local_counts[(key, window)] = _local_counts.get((key, window), 0) + 1
    return _local_counts[(key, window)]


async def rate_limit_hit(*, key: str, limit: int) -> float | None:
    """Count one frame for ``key``; return the seconds until the next window when over ``limit``, else None."""
    if limit <= 0:
        return None
    now = time.time()
    window = int(now // WINDOW_S)
    count = await _count_redis(key, window) if settings.REDIS_URL else _count_local(key, window)
    if count is None or count <= limit:
        return None
    return round((window + 1) * WINDOW_S - now, 1)
