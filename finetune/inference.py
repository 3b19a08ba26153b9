"""The process's inference engine, serving the active model version (Django glue).

``get_engine()`` returns the engine of this process, loading the active
``ModelVersion`` on first use, or None when no version is active (the chat then
says so and offers a human). ``engine_reset()`` drops it so the next call loads
the newly active version.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async

from .engine import NaiveEngine, load_for_inference
from .generation import Engine

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_version_id: int | None = None
_lock = asyncio.Lock()


def _load_active() -> tuple[int, Engine] | None:
    from .selectors import model_version_active

    version = model_version_active()
    if version is None:
        return None
    path = version.merged_path or version.adapter_path
    log.info("Loading model %s from %s", version.label, path)
    return version.pk, NaiveEngine(load_for_inference(path, label=version.label))


async def get_engine() -> Engine | None:
    global _engine, _engine_version_id
    async with _lock:
        if _engine is None:
            loaded = await sync_to_async(_load_active, thread_sensitive=False)()
            if loaded is not None:
                _engine_version_id, _engine = loaded
        return _engine


def engine_reset() -> None:
    global _engine, _engine_version_id
    _engine, _engine_version_id = None, None
