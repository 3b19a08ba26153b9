"""The Redis channel layer the project runs on: channels-redis with bounded connections that rides out outages.

``settings.CHANNEL_LAYERS`` names ``RedisChannelLayer`` from here when ``REDIS_URL`` is set.

- **Bounded, waiting pools.** channels-redis gives each event loop a redis-py pool that
  refuses a command once 100 connections are busy (``MaxConnectionsError``): when 500
  chat sockets closed at once, up to half of their ``group_discard`` calls failed. Here
  the pool holds ``pool_size`` connections, and a command waits (up to ``pool_timeout``
  seconds) for a free one instead of failing.
- **Redis going away is an outage, not a crash.** channels-redis lets a lost connection
  raise out of ``receive``, which ends every consumer reading the layer: daphne closed
  every chat socket with 1011. Here ``receive`` waits and tries again (backoff from
  ``retry_min`` to ``retry_max`` seconds, with jitter) for as long as it takes, so the
  sockets stay open; frames sent straight to a socket (a reply to its own question)
  keep flowing meanwhile, since they never touch Redis.
- **Group membership comes back.** A restarted Redis may have lost every key. The layer
  remembers the groups its process's channels joined, and when Redis answers again
  after an outage it adds them all back before anything is read, so broadcasts reach
  the sockets again. ``group_add`` during an outage is remembered and done then.
- **Leaving a group never raises.** A socket that could not leave its group stays
  listed until ``group_expiry``; messages to it expire unread. That is logged, not
  raised into the consumer's disconnect.

``send`` and ``group_send`` still raise during an outage (channel layers deliver at
most once; their callers log and go on, the database being the truth), and mark the
outage, so the next ``receive`` rejoins the groups.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import weakref

import redis
from channels_redis import core
from redis import asyncio as aioredis

log = logging.getLogger(__name__)

# What a lost or unreachable Redis raises (redis-py wraps most, not all, socket errors).
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)


class RedisChannelLayer(core.RedisChannelLayer):
    def __init__(
        self,
        *args,
        pool_size: int = 64,
        pool_timeout: float = 10.0,
        retry_min: float = 0.2,
        retry_max: float = 5.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        # group -> this process's channels in it, to add back after Redis lost them
        self.memberships: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self.outage = False  # a command failed for want of Redis; cleared once groups are rejoined
        self._recover_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        host = dict(self.hosts[index])
        if "master_name" in host:  # Sentinel: channels-redis's own pool
            return super().create_pool(index)
        host.setdefault("max_connections", self.pool_size)
        host.setdefault("timeout", self.pool_timeout)
        if "address" in host:
            return aioredis.BlockingConnectionPool.from_url(host.pop("address"), **host)
        return aioredis.BlockingConnectionPool(**host)

    # --- outages ---------------------------------------------------------------------------

    def _lost(self, what: str, exc: BaseException) -> None:
        if not self.outage:
            log.warning("Channel layer: Redis is unavailable (%s: %s); retrying until it is back", what, exc)
        self.outage = True

    async def _recover(self) -> None:
        """After an outage: check Redis answers, then add this process's channels back to their groups.

        Raises a connection error while Redis is still away. Run by one coroutine at a
        time; the others find the outage over.
        """
        loop = asyncio.get_running_loop()
        lock = self._recover_locks.get(loop)
        if lock is None:
            lock = self._recover_locks[loop] = asyncio.Lock()
        async with lock:
            if not self.outage:
                return
            for index in range(self.ring_size):
                await self.connection(index).ping()
            memberships = [(group, channel) for group, channels in self.memberships.items() for channel in channels]
            for group, channel in memberships:
                await super().group_add(group, channel)
            self.outage = False
            log.warning("Channel layer: Redis is back; %d group membership(s) restored", len(memberships))

    async def receive(self, channel: str) -> dict:
        delay = self.retry_min
        while True:
            try:
                if self.outage:
                    await self._recover()
                return await super().receive(channel)
            except CONNECTION_ERRORS as exc:
                self._lost("receive", exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not secrecy
            delay = min(delay * 2, self.retry_max)

    # --- sending: raise, but note the outage ------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        try:
            await super().send(channel, message)
        except CONNECTION_ERRORS as exc:
            self._lost("send", exc)
            raise

    async def group_send(self, group: str, message: dict) -> None:
        try:
            await super().group_send(group, message)
        except CONNECTION_ERRORS as exc:
            self._lost("group_send", exc)
            raise

    # --- groups: remembered, never raising ----------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        self.memberships[group].add(channel)
        try:
            await super().group_add(group, channel)
        except CONNECTION_ERRORS as exc:
            self._lost("group_add", exc)  # added when Redis is back

    async def group_discard(self, group: str, channel: str) -> None:
        members = self.memberships.get(group)
        if members is not None:
            members.discard(channel)
            if not members:
                del self.memberships[group]
        try:
            await super().group_discard(group, channel)
        except (redis.RedisError, *CONNECTION_ERRORS) as exc:
            log.warning(
                "Could not remove %s from group %s (%s); Redis drops it within %d s",
                channel,
                group,
                exc,
                self.group_expiry,
            )
