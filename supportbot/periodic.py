"""A daemon thread that runs one database job every N seconds, for the Celery workers' own timers.

Every worker runs two: the stale-training-run reaper (``finetune.services.training_runs``)
and the monitoring refresher (``conversations.monitoring.refresh``). A thread rather than
Celery's timer: the solo pool's timer waits while a training task holds the worker. A
failing round (a database or Redis hiccup) is logged and the next round tries again; the
thread's database connection is closed after every round, never held between them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def periodic_thread_start(name: str, interval_s: float, job: Callable[[], None], failure: str) -> threading.Thread:
    """Start a daemon thread called ``name`` that calls ``job()`` every ``interval_s`` seconds.

    ``failure`` is logged (with the traceback) when a round raises.
    """

    def run_forever() -> None:
        from django.db import connection

        while True:
            time.sleep(interval_s)
            try:
                job()
            except Exception:  # the next round tries again
                log.exception(failure)
            finally:
                connection.close()

    thread = threading.Thread(target=run_forever, name=name, daemon=True)
    thread.start()
    return thread
