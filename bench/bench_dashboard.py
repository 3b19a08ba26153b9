"""Bias-monitoring dashboard benchmark: /agent/monitoring/ with 100,000 rated replies.

    .venv/bin/python bench/bench_dashboard.py --database-url postgres://postgres@127.0.0.1:5432/sb_bench_bias
    .venv/bin/python bench/bench_dashboard.py --database-url ... --requests 10 --reseed

Seeds a database of its own (``--database-url``; migrated here) with ``--replies``
finished bot replies and their ``ReplyOutcome`` rows, bulk-created: three model
versions, six registers (a share of messages with two), four languages, four page
segments, 27 intents, twelve weeks; four in five reviewed (bad ratings, scores,
reasons, corrections), half with a customer's helpful answer, some handed off; one
segment (colloquial on v2) served worse, so the page has an alert to show. Seeding
is skipped when the database already holds that many (``--reseed`` forces it).

Then, signed in as a staff agent through Django's test client (one process: the
page's own cost, no network), it times:

- ``cold``: the page with ``?refresh=1``, every figure computed from the database
  (the grouped aggregation, histograms for the bootstrap, the tests, MetricFrame);
- ``warm``: the page as agents see it, the figures kept in the cache while no reply
  changed (the fingerprint query still runs on every view);
- ``compute``: ``monitoring_report_compute`` alone, and ``fingerprint`` alone.

Prints one JSON object with p50/p95/max ms, the row count, the database vendor and the
machine's load average. Target (issue 12): the dashboard renders in < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REGISTERS = ["plain", "polite", "colloquial", "typos", "offensive", "keyword_only"]
REGISTER_WEIGHTS = [40, 25, 15, 10, 3, 7]
LANGUAGES = (["en", "es", "fr", "de"], [85, 7, 5, 3])
PAGES = (["", "free", "pro", "enterprise"], [40, 30, 20, 10])
BATCH = 5000


def summary(values: list[float]) -> dict:
    ordered = sorted(values)

    def q(p):
        return round(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))], 1)

    return {"n": len(values), "p50_ms": q(50), "p95_ms": q(95), "max_ms": round(ordered[-1], 1)}


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)


def seed(replies: int, reseed: bool) -> int:
    from django.db import transaction
    from django.utils import timezone

    from conversations.models import Conversation, Message, ReplyOutcome
    from finetune.ml.probe_set import INTENTS
    from finetune.models import ModelVersion

    existing = ReplyOutcome.objects.count()
    if existing >= replies and not reseed:
        return existing
    ReplyOutcome.objects.all().delete()
    Message.objects.filter(conversation__session_key__startswith="bench-mon-").delete()
    Conversation.objects.filter(session_key__startswith="bench-mon-").delete()
    versions = [
        ModelVersion.objects.get_or_create(number=n, defaults={"base_model": "bench", "adapter_path": "/nonexistent"})[
            0
        ]
        for n in (1, 2, 3)
    ]
    rng = random.Random(12)
    now = timezone.now()
    made = 0
    conversation_size = 20
    while made < replies:
        count = min(BATCH, replies - made)
        with transaction.atomic():
            conversations = Conversation.objects.bulk_create(
                Conversation(session_key=f"bench-mon-{made + i}", status="closed", segment=rng.choices(*PAGES)[0])
                for i in range(0, count, conversation_size)
            )
            messages = Message.objects.bulk_create(
                Message(
                    conversation=conversations[i // conversation_size],
                    role="bot",
                    status="complete",
                    body="bench reply",
                )
                for i in range(count)
            )
            rows = []
            for i, message in enumerate(messages):
                conversation = conversations[i // conversation_size]
                age = rng.random() * 84  # twelve weeks
                version = versions[0] if age > 56 else versions[1] if age > 21 else versions[2]
                register = rng.choices(REGISTERS, REGISTER_WEIGHTS)[0]
                flags = {register}
                if rng.random() < 0.15:
                    flags.add(rng.choice(REGISTERS[1:]))
                intent = rng.choice(INTENTS)
                worse = 0.15 if ("colloquial" in flags and version.number == 2) else 0.0
                harder = 0.1 if intent in ("get_refund", "complaint") else 0.0
                reviewed = rng.random() < 0.8
                bad = reviewed and rng.random() < 0.12 + worse + harder
                reasons = {
                    r: False
                    for r in (
                        "incorrect",
                        "inappropriate",
                        "incomplete",
                        "outdated",
                        "personal_data",
                        "biased",
                        "other",
                    )
                }
                if bad:
                    reasons[rng.choice(list(reasons))] = True
                rows.append(
                    ReplyOutcome(
                        message=message,
                        model_version=version,
                        created_at=now - timedelta(days=age),
                        register=register,
                        **{f"reg_{name}": name in flags for name in REGISTERS},
                        language=rng.choices(*LANGUAGES)[0],
                        page_segment=conversation.segment,
                        intent=intent,
                        reply_words=max(3, int(rng.gauss(45, 15) - (15 if worse else 0))),
                        latency_ms=int(rng.lognormvariate(6.5, 0.4)),
                        helpful=(rng.random() > (0.3 + worse)) if rng.random() < 0.5 else None,
                        handoff=rng.random() < 0.05 + worse / 2,
                        reviewed=reviewed,
                        bad=bad if reviewed else None,
                        rating=(rng.randint(1, 2) if bad else rng.randint(3, 5)) if reviewed else None,
                        corrected=(bad and rng.random() < 0.5) if reviewed else None,
                        **{f"reason_{r}": (v if reviewed else None) for r, v in reasons.items()},
                    )
                )
            ReplyOutcome.objects.bulk_create(rows)
        made += count
        print(f"seeded {made}", file=sys.stderr)
    return ReplyOutcome.objects.count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--replies", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--reseed", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup_django(args.database_url)
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import connection
    from django.test import Client

    from conversations.monitoring.selectors import MonitoringFilters, _fingerprint, monitoring_report_compute
    from supportbot.roles import SUPPORT_AGENTS, roles_sync

    rows = seed(args.replies, args.reseed)
    roles_sync()
    user, _ = get_user_model().objects.get_or_create(username="bench-staff", defaults={"is_staff": True})
    user.groups.add(Group.objects.get(name=SUPPORT_AGENTS))
    client = Client()
    client.force_login(user)
    filters = MonitoringFilters(days=None)
    timings: dict[str, list[float]] = {"cold": [], "warm": [], "compute": [], "fingerprint": []}
    load_before = os.getloadavg()
    for _ in range(args.requests):
        start = time.perf_counter()
        response = client.get("/agent/monitoring/?days=all&refresh=1")
        timings["cold"].append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"/agent/monitoring/ answered {response.status_code}")
    html = response.content.decode()
    for _ in range(args.requests):
        start = time.perf_counter()
        response = client.get("/agent/monitoring/?days=all")
        timings["warm"].append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"/agent/monitoring/ answered {response.status_code}")
    for _ in range(max(1, args.requests // 2)):
        start = time.perf_counter()
        report = monitoring_report_compute(filters)
        timings["compute"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        _fingerprint(filters)
        timings["fingerprint"].append((time.perf_counter() - start) * 1000)
    print(
        json.dumps(
            {
                "rows": rows,
                "database": connection.vendor,
                "page_bytes": len(html),
                "alerts": [(a["segment"], a["version"], a["metric"]) for a in report["alerts"]],
                "tests": len(report["tests"]),
                **{name: summary(values) for name, values in timings.items()},
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
