"""The Redis cache backend: ``cache.clear()`` (how the monitoring cache is reset) deletes the cache's keys
and leaves everything else in the shared Redis database: channel-layer groups, queued Celery
tasks, the rate limit's windows."""

from __future__ import annotations

import uuid

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache, caches
from django.core.exceptions import ImproperlyConfigured

from conversations.monitoring.selectors import MonitoringFilters, monitoring_report
from conversations.monitoring.services import reply_outcome_refresh
from supportbot.cache import PrefixedRedisCache
from tests.factories import ModelVersionFactory, bot_reply

pytestmark = pytest.mark.django_db


def test_clearing_the_monitoring_cache_keeps_sockets_groups_queued_tasks_and_rate_limits(redis_url):
    assert isinstance(caches["default"], PrefixedRedisCache)
    raw = redis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:8]
    layer = get_channel_layer()
    group = f"conversation.test-{tag}"

    async def join() -> str:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        return channel

    channel = async_to_sync(join)()
    queue, limit = f"test-queue-{tag}", f"supportbot:ratelimit:test-{tag}"
    raw.lpush(queue, b'{"task": "still queued"}')
    raw.set(limit, b"1")
    # The monitoring figures as the dashboard keeps them, and a key of another version.
    reply_outcome_refresh(message_id=bot_reply(model_version=ModelVersionFactory()).pk)
    filters = MonitoringFilters(days=1000 + int(tag, 16) % 2000)  # a window (cache key) of this run's own
    assert monitoring_report(filters)["from_cache"] is False
    assert monitoring_report(filters)["from_cache"] is True
    cache.set(f"other-{tag}", 1, version=7)
    try:
        cache.clear()

        assert monitoring_report(filters)["from_cache"] is False  # the figures were dropped
        assert cache.get(f"other-{tag}", version=7) is None
        assert raw.lrange(queue, 0, -1) == [b'{"task": "still queued"}']
        assert raw.get(limit) == b"1"

        async def broadcast_and_receive() -> dict:
            await layer.group_send(group, {"type": "chat.message", "text": tag})
            return await layer.receive(channel)

        assert async_to_sync(broadcast_and_receive)() == {"type": "chat.message", "text": tag}
    finally:
        raw.delete(queue, limit)
        async_to_sync(layer.group_discard)(group, channel)


def test_the_backend_refuses_to_run_without_a_key_prefix(redis_url):
    with pytest.raises(ImproperlyConfigured, match="KEY_PREFIX"):
        PrefixedRedisCache(redis_url, {})


def test_the_settings_give_the_redis_cache_a_prefix_apart_from_the_rate_limit(redis_url, settings):
    entry = settings.CACHES["default"]
    assert entry["BACKEND"] == "supportbot.cache.PrefixedRedisCache"
    assert not "supportbot:ratelimit:x".startswith(f"{entry['KEY_PREFIX']}:")
