"""The bias-monitoring dashboard: figures against hand computation, the alert rule, who may see it, the CSV."""

from __future__ import annotations

import csv
import io
import math
import re
from datetime import timedelta

import numpy as np
import pytest
from django.core.cache import cache
from django.utils import timezone

from conversations.models import Message, ReplyOutcome
from conversations.monitoring.selectors import (
    BOOTSTRAP_BIN_WIDTH_SD,
    BOOTSTRAP_RESAMPLES,
    MonitoringFilters,
    monitoring_report,
    monitoring_report_compute,
)
from conversations.monitoring.services import reply_outcome_refresh
from conversations.review import services as review_services
from finetune.ml.fairness import bootstrap_mean_interval_from_counts
from tests.factories import ConversationFactory, ModelVersionFactory, bot_reply

pytestmark = pytest.mark.django_db


Z = 1.959963984540054  # the 97.5% normal quantile


def wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def outcomes(version, n: int, *, register: str, bad: int, intent: str = "track_order", page: str = "", **extra):
    """``n`` rated replies of one segment, ``bad`` of them rated bad (score 2, else 4)."""
    conversation = ConversationFactory(segment=page)
    now = timezone.now()
    replies = Message.objects.bulk_create(
        Message(conversation=conversation, role=Message.Role.BOT, status=Message.Status.COMPLETE, body="ok")
        for _ in range(n)
    )
    ReplyOutcome.objects.bulk_create(
        ReplyOutcome(
            message=reply,
            model_version=version,
            created_at=now - timedelta(days=1),
            register=register,
            **{f"reg_{register}": True},
            language="en",
            page_segment=page,
            intent=intent,
            reply_words=20,
            latency_ms=500,
            reviewed=True,
            bad=i < bad,
            rating=2 if i < bad else 4,
            corrected=False,
            helpful=None,
            **extra,
        )
        for i, reply in enumerate(replies)
    )


def cell(report, dimension: str, segment: str, version: str) -> dict:
    section = next(d for d in report["dimensions"] if d["name"] == dimension)
    return next(c for c in section["cells"] if c["segment"] == segment and c["version"] == version)


def alerts(report) -> set[tuple[str, str, str]]:
    return {(a["segment"], a["version"], a["metric"]) for a in report["alerts"]}


def test_figures_equal_hand_computed_ones_on_reviewed_replies(django_user_model):
    agent = django_user_model.objects.create_user("rev", is_staff=True)
    v1 = ModelVersionFactory(number=1)
    pro, free = ConversationFactory(segment="pro"), ConversationFactory(segment="free")
    # Three replies on the pro page (scores 5, 2, 4; one bad, one not helpful), two on the free page.
    plan = [
        (pro, True, 5, True),
        (pro, False, 2, False),
        (pro, True, 4, None),
        (free, True, 5, True),
        (free, True, 3, None),
    ]
    for conversation, good, rating, helpful in plan:
        reply = bot_reply(conversation=conversation, model_version=v1, latency_ms=100 * rating, helpful=helpful)
        review_services.review_submit(
            agent=agent, message_id=reply.pk, good=good, rating=rating, reasons=[] if good else ["incorrect"]
        )
    report = monitoring_report_compute(MonitoringFilters())
    pro_cell = cell(report, "page_segment", "pro", "v1")
    assert pro_cell["n"] == 3
    assert pro_cell["small"]  # fewer than 20: greyed, still shown
    bad = pro_cell["metrics"]["bad"]
    assert bad["value"] == pytest.approx(1 / 3)
    assert (bad["low"], bad["high"]) == pytest.approx(wilson(1, 3))
    assert pro_cell["metrics"]["score"]["value"] == pytest.approx((5 + 2 + 4) / 3)
    assert pro_cell["metrics"]["reason_incorrect"]["value"] == pytest.approx(1 / 3)
    assert pro_cell["metrics"]["helpful"]["value"] == pytest.approx(1 / 2)  # two answers, one yes
    assert pro_cell["metrics"]["helpful"]["n"] == 2
    assert pro_cell["metrics"]["latency_ms"]["value"] == pytest.approx((500 + 200 + 400) / 3)
    assert pro_cell["metrics"]["reply_words"]["value"] == pytest.approx(4.0)  # "Your order ships today."
    free_cell = cell(report, "page_segment", "free", "v1")
    assert free_cell["metrics"]["bad"]["value"] == 0.0
    assert free_cell["metrics"]["score"]["value"] == pytest.approx(4.0)
    overall = report["by_version"][0]["metrics"]
    assert overall["bad"]["value"] == pytest.approx(1 / 5)
    assert overall["score"]["value"] == pytest.approx(19 / 5)
    # The score's bootstrap interval holds the mean; the disaggregation's figures are the cells'.
    score = pro_cell["metrics"]["score"]
    assert score["method"] == "bootstrap"
    assert score["low"] <= score["value"] <= score["high"]
    disagg = next(
        r
        for r in next(d for d in report["dimensions"] if d["name"] == "page_segment")["disaggregation"]
        if r["metric"] == "bad"
    )
    assert disagg["overall"] == pytest.approx(1 / 5)
    assert disagg["by_group"] == {"free": 0.0, "pro": pytest.approx(1 / 3)}
    assert disagg["difference"] == pytest.approx(1 / 3)
    assert report["alerts"] == []  # n = 3: never an alert


def test_an_alert_fires_on_a_real_disparity():
    v1 = ModelVersionFactory(number=1)
    outcomes(v1, 100, register="colloquial", bad=40)
    outcomes(v1, 100, register="plain", bad=10)
    report = monitoring_report_compute(MonitoringFilters())
    assert ("colloquial", "v1", "bad") in alerts(report)
    assert ("colloquial", "v1", "score") in alerts(report)
    assert not any(segment == "plain" for segment, _, _ in alerts(report))
    test = next(t for t in report["tests"] if t["segment"] == "colloquial" and t["metric"] == "bad")
    assert test["value"] == pytest.approx(0.4)
    assert test["expected"] == pytest.approx(0.1)  # the rest, on the same intent
    assert test["basis"] == "within-intent"
    assert cell(report, "register", "colloquial", "v1")["alerts"] == ["bad", "score"]


def test_no_alert_on_even_service():
    v1 = ModelVersionFactory(number=1)
    outcomes(v1, 100, register="colloquial", bad=10)
    outcomes(v1, 100, register="plain", bad=10)
    assert monitoring_report_compute(MonitoringFilters())["alerts"] == []


def test_no_alert_on_a_small_segment_however_large_its_gap():
    v1 = ModelVersionFactory(number=1)
    outcomes(v1, 10, register="colloquial", bad=8)
    outcomes(v1, 200, register="plain", bad=20)
    report = monitoring_report_compute(MonitoringFilters())
    assert report["alerts"] == []
    small = cell(report, "register", "colloquial", "v1")
    assert small["small"]
    assert small["metrics"]["bad"]["value"] == pytest.approx(0.8)  # shown, not hidden
    test = next(t for t in report["tests"] if t["segment"] == "colloquial" and t["metric"] == "bad")
    assert "below the minimum" in test["reason"]


def test_a_segment_asking_harder_questions_is_not_called_biased():
    v1 = ModelVersionFactory(number=1)
    # Refund questions get 40% bad ratings whoever asks; colloquial customers ask them more.
    outcomes(v1, 120, register="colloquial", bad=48, intent="get_refund")
    outcomes(v1, 40, register="colloquial", bad=4, intent="track_order")
    outcomes(v1, 40, register="plain", bad=16, intent="get_refund")
    outcomes(v1, 120, register="plain", bad=12, intent="track_order")
    report = monitoring_report_compute(MonitoringFilters())
    raw = next(t for t in report["tests"] if t["segment"] == "colloquial" and t["metric"] == "bad")
    assert (raw["value"], raw["value_rest"]) == (pytest.approx(0.325), pytest.approx(0.175))
    assert raw["expected"] == pytest.approx(raw["value"])  # same intents: the same rate
    assert ("colloquial", "v1", "bad") not in alerts(report)


def test_versions_are_compared_separately_and_thresholds_come_from_settings(settings):
    v1, v2 = ModelVersionFactory(number=1), ModelVersionFactory(number=2)
    outcomes(v1, 100, register="colloquial", bad=40)
    outcomes(v1, 100, register="plain", bad=10)
    outcomes(v2, 100, register="colloquial", bad=10)
    outcomes(v2, 100, register="plain", bad=10)
    report = monitoring_report_compute(MonitoringFilters())
    assert ("colloquial", "v1", "bad") in alerts(report)
    assert not any(version == "v2" for _, version, _ in alerts(report))
    settings.SUPPORTBOT_BIAS_MIN_N = 150
    assert monitoring_report_compute(MonitoringFilters())["alerts"] == []


def test_mean_intervals_are_bootstrapped_from_each_segments_own_values():
    """The value histograms behind the bootstrap count a reply in each register it carries, and
    the page segment's empty label and the rest apart; each cell's interval is the bootstrap of
    exactly its own replies' values (merged into quarter-sd bins as the dashboard does)."""
    v1 = ModelVersionFactory(number=1)
    conversation = ConversationFactory(segment="pro")
    replies = Message.objects.bulk_create(
        Message(conversation=conversation, role=Message.Role.BOT, status=Message.Status.COMPLETE, body="ok")
        for _ in range(90)
    )
    words = [5 + (i * 7) % 61 for i in range(90)]  # 61 distinct lengths: the coarsening applies
    ReplyOutcome.objects.bulk_create(
        ReplyOutcome(
            message=reply,
            model_version=v1,
            created_at=timezone.now() - timedelta(days=1),
            register="colloquial" if i < 60 else "plain",
            reg_colloquial=i < 60,
            reg_typos=30 <= i < 75,  # 30 colloquial and 15 plain replies also carry typos
            reg_plain=i >= 60,
            language="en",
            page_segment="pro" if i % 3 else "",
            intent="track_order",
            reply_words=words[i],
            latency_ms=400 + i,
        )
        for i, reply in enumerate(replies)
    )
    report = monitoring_report_compute(MonitoringFilters())
    expected = {
        ("register", "colloquial"): range(60),
        ("register", "typos"): range(30, 75),
        ("register", "plain"): range(60, 90),
        ("page_segment", "pro"): [i for i in range(90) if i % 3],
        ("page_segment", "(none)"): [i for i in range(90) if not i % 3],
    }
    for (dimension, segment), chosen in expected.items():
        values, counts = np.unique([words[i] for i in chosen], return_counts=True)
        interval = bootstrap_mean_interval_from_counts(
            values, counts, n_resamples=BOOTSTRAP_RESAMPLES, seed=0, bin_width_sd=BOOTSTRAP_BIN_WIDTH_SD
        )
        figure = cell(report, dimension, segment, "v1")["metrics"]["reply_words"]
        assert figure["n"] == len(chosen)
        assert figure["value"] == pytest.approx(np.mean([words[i] for i in chosen]))
        assert (figure["low"], figure["high"], figure["method"]) == (interval.low, interval.high, "bootstrap")


def test_the_report_is_kept_until_replies_change(settings):
    cache.clear()
    v1 = ModelVersionFactory(number=1)
    outcomes(v1, 30, register="plain", bad=3)
    first = monitoring_report(MonitoringFilters())
    again = monitoring_report(MonitoringFilters())
    assert (first["from_cache"], again["from_cache"], again["fresh"]) == (False, True, True)
    settings.SUPPORTBOT_MONITORING_CACHE_S = 0
    outcomes(v1, 5, register="plain", bad=0)
    changed = monitoring_report(MonitoringFilters())
    assert changed["from_cache"] is False
    assert changed["rows"] == 35


def test_a_review_of_a_reply_already_counted_changes_the_kept_figures(agent, settings):
    """A reply's outcome is written when it finishes and again when it is reviewed: the second
    write must change the window's fingerprint, or the kept figures would be served as current."""
    settings.SUPPORTBOT_MONITORING_CACHE_S = 0
    reply = bot_reply(model_version=ModelVersionFactory(number=1))
    reply_outcome_refresh(message_id=reply.pk)  # as when the reply finished
    first = monitoring_report(MonitoringFilters())
    assert first["by_version"][0]["metrics"]["bad"]["n"] == 0
    assert monitoring_report(MonitoringFilters())["from_cache"] is True
    review_services.review_submit(agent=agent, message_id=reply.pk, good=False, rating=1, reasons=["incorrect"])
    after = monitoring_report(MonitoringFilters())
    assert after["from_cache"] is False
    assert after["by_version"][0]["metrics"]["bad"]["value"] == 1.0


def test_the_page_is_for_staff_and_offers_a_csv(client, agent, django_user_model):
    cache.clear()
    v1 = ModelVersionFactory(number=1)
    outcomes(v1, 100, register="colloquial", bad=40)
    outcomes(v1, 100, register="plain", bad=10)
    client.force_login(agent)
    page = client.get("/agent/monitoring/?days=all")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Overlapping intervals do not mean equal service" in html
    assert 'id="mon-data"' in html
    assert "mon-alert" in html
    assert '<script src="/static/workspace/monitoring.js"' in html
    assert not re.search(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//', html)  # no CDN
    download = client.get("/agent/monitoring/figures.csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(download.streaming_content).decode())))
    flagged = [r for r in rows if r["alert"] == "true"]
    assert {(r["dimension"], r["segment"], r["metric"]) for r in flagged} >= {("register", "colloquial", "bad")}
    bad = next(r for r in rows if (r["dimension"], r["segment"], r["metric"]) == ("register", "colloquial", "bad"))
    assert float(bad["value"]) == pytest.approx(0.4)
    assert bad["n"] == "100"
    agent.is_staff = False
    agent.save()
    assert client.get("/agent/monitoring/").status_code == 403
    client.logout()
    assert client.get("/agent/monitoring/").status_code == 302


def test_an_empty_window_and_bad_filters_still_render(client, agent):
    client.force_login(agent)
    page = client.get("/agent/monitoring/?days=bogus&version=x")
    assert page.status_code == 200
    html = page.content.decode()
    assert "0 finished replies of the last 90 days" in html  # bad input falls back to the default window
    assert "No alert" in html
    report = monitoring_report_compute(MonitoringFilters(days=7))
    assert (report["rows"], report["tests"], report["versions"]) == (0, [], [])
