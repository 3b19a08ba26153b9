"""The chat rate limit is a sliding one-minute window, in-process and in Redis.

A fixed per-minute counter reset at each minute boundary: a burst straddling one
got twice the budget (and the rate-limit tests flaked when a run crossed it).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conversations import ratelimit


@pytest.fixture(autouse=True)
def _fresh_local_log():
    ratelimit._local_log.clear()
    yield
    ratelimit._local_log.clear()


def test_the_window_slides_across_a_minute_boundary():
    # Three frames just before a minute boundary; a fixed window would allow three more after it.
    for _ in range(3):
        assert ratelimit._hit_local("s", 3, now=119.9) is None
    wait = ratelimit._hit_local("s", 3, now=120.1)
    assert wait == pytest.approx(59.8)
    assert ratelimit._hit_local("s", 3, now=179.8) is not None
    assert ratelimit._hit_local("s", 3, now=180.0) is None  # a minute after the first


def test_refused_frames_are_not_counted_and_keys_are_separate():
    assert ratelimit._hit_local("a", 1, now=10.0) is None
    for t in (20.0, 30.0, 69.0):  # a client hammering during the wait does not extend it
        assert ratelimit._hit_local("a", 1, now=t) == pytest.approx(70.0 - t)
    assert ratelimit._hit_local("a", 1, now=70.5) is None
    assert ratelimit._hit_local("b", 1, now=30.0) is None


def test_idle_sessions_are_forgotten():
    ratelimit._local_pruned_at = 0.0
    ratelimit._hit_local("old", 5, now=100.0)
    ratelimit._hit_local("new", 5, now=200.0)
    assert set(ratelimit._local_log) == {"new"}


def test_rate_limit_hit_without_redis_uses_the_process_log(settings):
    settings.REDIS_URL = ""

    async def hits():
        return [await ratelimit.rate_limit_hit(key="k", limit=2) for _ in range(3)]

    first, second, third = asyncio.run(hits())
    assert first is None
    assert second is None
    assert 59 < third <= 60
    assert asyncio.run(ratelimit.rate_limit_hit(key="k", limit=0)) is None  # 0 turns the limit off


def test_redis_window_slides_and_is_atomic(redis_url, settings):
    settings.REDIS_URL = redis_url
    key = f"test:{uuid.uuid4().hex}"

    async def run():
        # Twenty concurrent frames against a limit of 5: exactly five get through.
        results = await asyncio.gather(*(ratelimit._hit_redis(key, 5, window_s=1.0) for _ in range(20)))
        allowed = sum(r is None for r in results)
        waits = [r for r in results if r is not None]
        # A client that waits what it was told gets through once the window has slid past the
        # five (refused frames do not count, so asking again does not push that back).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (retry := await ratelimit._hit_redis(key, 5, window_s=1.0)) is not None:
            assert 0 < retry <= 1.0
            assert loop.time() < deadline, "the window never slid past the allowed frames"
            await asyncio.sleep(retry)
        return allowed, waits

    allowed, waits = asyncio.run(run())
    assert allowed == 5
    assert len(waits) == 15
    assert all(0 < w <= 1.0 for w in waits)


def test_redis_down_lets_frames_through_with_a_warning(settings, caplog):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

    async def hit():
        return await ratelimit.rate_limit_hit(key="k", limit=1), await ratelimit.rate_limit_hit(key="k", limit=1)

    assert asyncio.run(hit()) == (None, None)
    assert "Rate limit not applied" in caplog.text


def test_frames_other_than_messages_share_a_larger_budget(settings):
    settings.SUPPORTBOT_RATE_LIMIT = 10
    assert ratelimit.rate_limit_for("msg") == 10
    assert ratelimit.rate_limit_for("other") == 10 * ratelimit.OTHER_FRAMES_LIMIT_FACTOR
