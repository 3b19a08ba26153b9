"""The thread every Celery worker runs to recompute the monitoring dashboard's figures periodically.

Started by ``conversations.tasks`` when a worker is ready, on ``supportbot.periodic`` (a
thread rather than Celery beat: nothing else needs a beat process, and every worker
running it is harmless: ``selectors.monitoring_report_refresh`` takes a lock in the
cache, and recomputes only when replies changed).
"""

from __future__ import annotations

import logging
import threading

from supportbot.periodic import periodic_thread_start

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

    def refresh() -> None:
        report = monitoring_report_refresh()
        if report is not None:
            log.info(
                "Recomputed the monitoring figures: %s replies, %s alerts, computed at %s",
                report["rows"],
                len(report["alerts"]),
                report["computed_at"],
            )

    thread = periodic_thread_start(
        "monitoring-refresher", interval, refresh, "Could not recompute the monitoring figures"
    )
    log.info("Refreshing the monitoring figures every %s s", interval)
    return thread
