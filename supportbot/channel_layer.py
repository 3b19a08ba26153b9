"""The Redis channel layer the project runs on: channels-redis with bounded connections.

``settings.CHANNEL_LAYERS`` names ``RedisChannelLayer`` from here when ``REDIS_URL`` is set.

- **Bounded, waiting pools.** channels-redis gives each event loop a redis-py pool that
  refuses a command once 100 connections are busy (``MaxConnectionsError``): when 500
  chat sockets closed at once, up to half of their ``group_discard`` calls failed. Here
  the pool holds ``pool_size`` connections, and a command waits (up to ``pool_timeout``
  seconds) for a free one instead of failing.
- **Leaving a group never raises.** A socket that could not leave its group stays
  listed until ``group_expiry``; messages to it expire unread. That is logged, not
  raised into the consumer's disconnect.
"""

from __future__ import annotations

import logging

import redis
from channels_redis import core
from redis import asyncio as aioredis

log = logging.getLogger(__name__)


class RedisChannelLayer(core.RedisChannelLayer):
    def __init__(self, *args, pool_size: int = 64, pool_timeout: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        if "master_name" in host:  # Sentinel: channels-redis's own pool
            return super().create_pool(index)
        host.setdefault("max_connections", self.pool_size)
        host.setdefault("timeout", self.pool_timeout)
        if "address" in host:
            return aioredis.BlockingConnectionPool.from_url(host.pop("address"), **host)
        return aioredis.BlockingConnectionPool(**host)

    async def group_discard(self, group: str, channel: str) -> None:
        try:
            await super().group_discard(group, channel)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "Could not remove %s from group %s (%s); Redis drops it within %d s",
                channel,
                group,
                exc,
                self.group_expiry,
            )
