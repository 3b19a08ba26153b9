"""The Redis cache backend the project runs on: Django's, except that ``clear()`` deletes only its own keys.

``settings.CACHES`` names ``PrefixedRedisCache`` from here when ``REDIS_URL`` is set. The
cache shares its Redis database with the channel layer (chat sockets' groups), the
Celery broker (queued tasks) and the rate limit; Django's ``RedisCache.clear()`` runs
``FLUSHDB``, which would wipe all of those. Here ``clear()`` deletes only the keys under
the cache's ``KEY_PREFIX`` (``"<prefix>:<version>:<key>"``, Django's key format), found
with ``SCAN`` in batches so Redis never blocks on one large command.
"""

from __future__ import annotations

from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import ImproperlyConfigured

CLEAR_BATCH = 500  # keys per SCAN round and per UNLINK: bounded work per Redis command


class PrefixedRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        if not self.key_prefix:
            # Without a prefix there is no telling the cache's keys from the broker's.
            raise ImproperlyConfigured("PrefixedRedisCache needs a KEY_PREFIX in its CACHES entry.")

    def clear(self) -> bool:
        """Delete every key of this cache (any version), and nothing else in the database."""
        client = self._cache.get_client(None, write=True)
        pattern = f"{_escape_glob(self.key_prefix)}:*"
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=CLEAR_BATCH):
            batch.append(key)
            if len(batch) >= CLEAR_BATCH:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
        return True


def _escape_glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
