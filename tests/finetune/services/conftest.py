"""Fixtures of the fine-tuning service tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fast_heartbeat(settings):
    """Heartbeats every 0.2 s, and a run counts as dead after 5 s without one."""
    settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = 0.2
    settings.SUPPORTBOT_TRAINING_STALE_AFTER = 5
