"""The thread every Celery worker runs to recompute the monitoring dashboard's figures periodically.

Started by ``conversations.tasks`` when a worker is ready. A thread rather than Celery
beat: nothing else needs a beat process, and every worker running it is harmless
(``selectors.monitoring_report_refresh`` takes a lock in the cache, and recomputes only
when replies changed). A thread rather than Celery's timer: the solo pool's timer waits
while a training task holds the worker.
"""

from __future__ import annotations

import logging
import threading
import time

from .selectors import monitoring_refresh_interval, monitoring_report_refresh

log = logging.getLogger(__name__)


def monitoring_refresher_start(*, interval_s: float | None = None) -> threading.Thread | None:
    """Run ``monitoring_report_refresh`` every ``interval_s`` (``SUPPORTBOT_MONITORING_REFRESH_S``) in a
    daemon thread; None (and no thread) when it is turned off or the cache is not shared."""
    interval = monitoring_refresh_interval() if interval_s is None else interval_s
    if not interval:
        log.info(
            "Monitoring figures are not refreshed by this worker: SUPPORTBOT_MONITORING_REFRESH_S is 0, "
            "or the cache is this process's own (set REDIS_URL); the page computes them when opened"
        )
        return None

    def refresh_forever() -> None:
        from django.db import connection

        while True:
            time.sleep(interval)
            try:
                report = monitoring_report_refresh()
                if report is not None:
                    log.info(
                        "Recomputed the monitoring figures: %s replies, %s alerts, computed at %s",
                        report["rows"],
                        len(report["alerts"]),
                        report["computed_at"],
                    )
            except Exception:  # a database or Redis hiccup: the next round tries again
                log.exception("Could not recompute the monitoring figures")
            finally:
                connection.close()  # this thread's own connection, not held between rounds

    thread = threading.Thread(target=refresh_forever, name="monitoring-refresher", daemon=True)
    thread.start()
    log.info("Refreshing the monitoring figures every %s s", interval)
    return thread
