"""The project's ASGI application with a model that writes slowly: a pause before every token.

For tests that must catch a reply while it streams (a server stopped mid-reply):

    daphne tests.conversations.slow_asgi:application

``SUPPORTBOT_TEST_TOKEN_DELAY_S`` (default 0.5) is the pause. Everything else is the
real stack: the real model, engine, safety filter, database and channel layer.
"""

from __future__ import annotations

import asyncio
import os

# isort: off
from supportbot.asgi import application  # noqa: F401 - what daphne serves; sets Django up first
from conversations import replies

# isort: on

DELAY_S = float(os.environ.get("SUPPORTBOT_TEST_TOKEN_DELAY_S", "0.5"))
_get_engine = replies.get_engine


class SlowEngine:
    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stream(self, request):
        async for event in self._engine.stream(request):
            await asyncio.sleep(DELAY_S)
            yield event


async def slow_get_engine():
    engine = await _get_engine()
    return None if engine is None else SlowEngine(engine)


replies.get_engine = slow_get_engine
