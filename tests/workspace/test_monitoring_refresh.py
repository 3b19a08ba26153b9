"""The periodic recomputation of the monitoring figures: the service and its lock, what the page says,
and a real Celery worker that refreshes them after a new rated reply without anyone running a command."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from django.core.cache import cache
from django.utils import timezone

from conversations.monitoring import selectors as monitoring
from conversations.monitoring.selectors import MonitoringFilters, monitoring_report, monitoring_report_refresh
from conversations.monitoring.services import reply_outcome_refresh
from conversations.review import services as review_services
from finetune.selectors import bias_thresholds
from tests.conftest import ROOT, celery_worker_command, child_process_env, stop_process
from tests.factories import ModelVersionFactory, bot_reply

pytestmark = pytest.mark.django_db


def rated_reply(version, agent, *, good: bool = True) -> None:
    """A bot reply that finishes (its outcome written, unreviewed), then an agent's rating of it."""
    reply = bot_reply(model_version=version)
    reply_outcome_refresh(message_id=reply.pk)
    review_services.review_submit(
        agent=agent, message_id=reply.pk, good=good, rating=4 if good else 2, reasons=[] if good else ["incorrect"]
    )


def kept(filters: MonitoringFilters) -> dict | None:
    return cache.get(monitoring._cache_key(filters, bias_thresholds()))


def rated_in_kept(filters: MonitoringFilters) -> int:
    """How many rated replies the kept figures count (0 when none are kept)."""
    report = kept(filters)
    return report["by_version"][0]["metrics"]["bad"]["n"] if report and report["by_version"] else 0


def test_refresh_recomputes_only_when_replies_changed(agent):
    version = ModelVersionFactory()
    rated_reply(version, agent)
    filters = MonitoringFilters.from_query({})

    first = monitoring_report_refresh()
    assert first is not None
    assert first["rows"] == 1
    assert kept(filters)["computed_at"] == first["computed_at"]
    assert monitoring_report_refresh() is None  # nothing changed: the kept figures are current

    rated_reply(version, agent, good=False)
    second = monitoring_report_refresh()
    assert second is not None
    assert second["rows"] == 2
    assert monitoring_report(filters)["computed_at"] == second["computed_at"]  # the page serves them
    assert cache.get(monitoring.REFRESH_LOCK) is None  # released


def test_refresh_skips_while_another_process_holds_the_lock(agent):
    rated_reply(ModelVersionFactory(), agent)
    assert cache.add(monitoring.REFRESH_LOCK, "another-worker", timeout=60)
    try:
        assert monitoring_report_refresh() is None
        assert kept(MonitoringFilters.from_query({})) is None  # nothing computed
        assert cache.get(monitoring.REFRESH_LOCK) == "another-worker"  # and not released by this one
    finally:
        cache.delete(monitoring.REFRESH_LOCK)
    assert monitoring_report_refresh()["rows"] == 1


def test_the_page_says_how_often_the_figures_are_refreshed(client, agent, settings):
    client.force_login(agent)
    settings.SUPPORTBOT_MONITORING_REFRESH_S = 120
    settings.SUPPORTBOT_MONITORING_CACHE_S = 300
    shared = monitoring.monitoring_cache_is_shared()
    page = client.get("/agent/monitoring/").content.decode()
    if shared:
        assert "The workers recompute the figures every 120 s when replies changed." in page
        other = client.get("/agent/monitoring/?days=7").content.decode()
        assert "this one is recomputed when the page is opened and replies changed" in other
    else:  # each process's own cache: a worker cannot fill the page's, so it does not try
        assert "Recomputed when the page is opened and replies changed, once the kept figures are 300 s old." in page
    settings.SUPPORTBOT_MONITORING_REFRESH_S = 0
    page = client.get("/agent/monitoring/").content.decode()
    assert "The workers recompute" not in page
    assert "once the kept figures are 300 s old" in page


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_refreshes_the_figures_after_a_new_rated_reply(redis_url, tmp_path, client, agent):
    version = ModelVersionFactory()
    rated_reply(version, agent)
    filters = MonitoringFilters.from_query({})
    before = monitoring_report(filters)
    assert before["rows"] == 1

    queue = f"test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        celery_worker_command(queue, f"{queue}@%h"),
        cwd=ROOT,
        env=child_process_env(SUPPORTBOT_CELERY_QUEUE=queue, SUPPORTBOT_MONITORING_REFRESH_S="1"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180  # a loaded machine starts a worker slowly
        while "ready." not in log.read_text():
            assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        assert "Refreshing the monitoring figures every 1.0 s" in log.read_text()

        written = timezone.now()
        rated_reply(version, agent, good=False)  # nobody runs monitoring_refresh after this
        deadline = time.monotonic() + 120
        while rated_in_kept(filters) != 2:
            assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not refreshed in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        refreshed = kept(filters)
        assert refreshed["rows"] == 2
        assert refreshed["by_version"][0]["metrics"]["bad"]["value"] == 0.5  # the new rating counted
        assert refreshed["computed_at"] > written.isoformat()
        assert "Recomputed the monitoring figures: 2 replies" in log.read_text()

        client.force_login(agent)
        page = client.get("/agent/monitoring/").content.decode()
        assert "2 finished replies" in page
        assert f"Computed {refreshed['computed_at'][:19]} UTC (kept)." in page
    finally:
        stop_process(worker)
