"""Celery hooks of the chat app: every worker, once ready, recomputes the bias-monitoring figures
every ``SUPPORTBOT_MONITORING_REFRESH_S`` (``conversations.monitoring.refresh``)."""

from __future__ import annotations

from celery.signals import worker_ready


@worker_ready.connect
def _start_monitoring_refresher(**kwargs) -> None:
    from .monitoring.refresh import monitoring_refresher_start

    monitoring_refresher_start()
