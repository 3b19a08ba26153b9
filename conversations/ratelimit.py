"""Per-session rate limit of chat frames, shared by every socket of the session.

A sliding one-minute window: a frame is allowed when fewer than ``limit`` frames
were allowed in the last 60 seconds. Refused frames are not counted, so a client
that waits the ``retry_after`` it was told gets through.

With ``REDIS_URL`` set the window is a sorted set in Redis, checked and updated
by one Lua script (atomic, timed by the Redis server's clock), so all sockets in
all daphne processes share the budget. Without it, an in-process log serves the
laptop demo's single process. If Redis does not answer, frames are let through
and a warning is logged: the chat keeps working, and the channel layer, on the
same Redis, is failing loudly anyway.

(A fixed per-minute counter was used before; it reset at each minute boundary,
so a burst straddling one got twice the budget and tests flaked.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
import weakref

from django.conf import settings

log = logging.getLogger(__name__)

WINDOW_S = 60
_KEY_PREFIX = "supportbot:ratelimit"
# Frames other than ``message`` that touch the database (resume, csat, request_human)
# share a budget this many times the message limit: reconnects resume, people click.
OTHER_FRAMES_LIMIT_FACTOR = 3

# KEYS[1]: the window's sorted set (member: a unique id; score: ms when allowed).
# ARGV: window in ms, limit, a unique member id.
# Returns -1 when the frame is allowed (and recorded), else the ms until it would be.
_SLIDING_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return -1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(tonumber(oldest[2]) + window - now, 1)
"""

# redis.asyncio clients hold connections bound to the event loop that made them.
_scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_local_log: dict[str, collections.deque[float]] = {}
_local_pruned_at = 0.0


def _redis_script():
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    script = _scripts.get(loop)
    if script is None:
        # A bounded pool that waits for a free connection: a burst of frames from many
        # sockets queues up instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.SUPPORTBOT_REDIS_POOL_SIZE,
            timeout=2,
            socket_timeout=2,
            socket_connect_timeout=2,
        )
        client = aioredis.Redis(connection_pool=pool)
        script = client.register_script(_SLIDING_WINDOW_LUA)
        _scripts[loop] = script
    return script


async def _hit_redis(key: str, limit: int, window_s: float = WINDOW_S) -> float | None:
    """Seconds until allowed (None when allowed now, or when Redis did not answer)."""
    import redis

    try:
        wait_ms = await _redis_script()(
            keys=[f"{_KEY_PREFIX}:{key}"], args=[int(window_s * 1000), limit, uuid.uuid4().hex]
        )
    except (redis.RedisError, OSError) as exc:
        log.warning("Rate limit not applied: Redis did not answer (%s)", exc)
        return None
    return None if int(wait_ms) < 0 else int(wait_ms) / 1000


def _hit_local(key: str, limit: int, now: float, window_s: float = WINDOW_S) -> float | None:
    global _local_pruned_at
    if now - _local_pruned_at > 1.0:  # forget sessions idle for a whole window, at most once a second
        for stale in [k for k, hits in _local_log.items() if not hits or hits[-1] <= now - window_s]:
            del _local_log[stale]
        _local_pruned_at = now
    hits = _local_log.setdefault(key, collections.deque())
    while hits and hits[0] <= now - window_s:
        hits.popleft()
    if len(hits) < limit:
        hits.append(now)
        return None
    return hits[0] + window_s - now


def rate_limit_for(bucket: str) -> int:
    """Frames a minute allowed in ``bucket``: ``"msg"`` (customer messages) or ``"other"`` (the rest)."""
    limit = settings.SUPPORTBOT_RATE_LIMIT
    return limit if bucket == "msg" else limit * OTHER_FRAMES_LIMIT_FACTOR


async def rate_limit_hit(*, key: str, limit: int) -> float | None:
    """Count one frame for ``key``; when it is over ``limit`` in the last minute, refuse it
    (it is not counted) and return the seconds until one would be allowed, else None."""
    if limit <= 0:
        return None
    if settings.REDIS_URL:
        wait = await _hit_redis(key, limit)
    else:
        wait = _hit_local(key, limit, time.monotonic())
    return None if wait is None else max(round(wait, 1), 0.1)
