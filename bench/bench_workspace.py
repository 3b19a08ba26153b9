"""Agent workspace benchmark: the queue pages and the agents' socket with many reviewed replies in the database.

    .venv/bin/python bench/bench_workspace.py --reviewed 10000 --requests 200
    .venv/bin/python bench/bench_workspace.py --database-url postgres://postgres@127.0.0.1:5432/sb_bench_ws

It seeds a database of its own (``--database-url``, default a SQLite file under
var/bench/workspace/; migrated here) with ``--reviewed`` bot replies that agents
reviewed (each with its question, a submitted queue entry and a review; every
tenth reviewed by a second agent, as double review does), ``--open`` replies still
waiting in the queues and ``--waiting`` conversations waiting for a human. Seeding is
skipped when the database already holds that many (``--reseed`` forces it). Then it
starts one daphne process on that database and, signed in as a support agent,
measures from one client, one request at a time:

- the queue pages: ``/agent/`` (all open entries, oldest first), one queue
  (``?source=flagged``), a search (``?q=…``), the submitted entries (``?state=submitted``,
  10,000 rows to page through), and the review page of one entry;
- the agents' socket: connecting to ``/ws/agent/`` until its ``hello`` frame (the
  waiting count and the open counts per queue), a ``counts`` round trip, and a
  ``renew`` round trip (a claim's lease written);
- the progress and agreement page (``/agent/stats/``; it reads every review), for
  reference: not a target.

Prints one JSON object: p50/p95/max in ms per measurement, row counts, the
database vendor. Target (issue 11): queue page and socket p95 < 200 ms.
The server's REDIS_URL (channel layer) comes from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUESTIONS = [
    "Where is my parcel?",
    "How do I reset my password?",
    "I want a refund for my last purchase.",
    "Can I change the delivery address?",
    "Which payment methods do you accept?",
]
SEGMENTS = ["free", "pro", "enterprise", ""]
INTENTS = ["track_order", "reset_password", "get_refund", "change_address", "payment_methods"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 1)


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "max_ms": percentile(values, 100),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the database ----------------------------------------------------------------------------


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)


def seed(*, reviewed: int, open_items: int, waiting: int, reseed: bool) -> dict:
    """Bulk-insert the rows the pages read; returns what the database holds."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import transaction
    from django.utils import timezone

    from conversations.models import Conversation, Message, QueueItem, Review
    from finetune.models import ModelVersion
    from supportbot.roles import SUPPORT_AGENTS

    User = get_user_model()  # noqa: N806
    agents = []
    for name in ("bench-ann", "bench-ben", "bench-cat", "bench-dan"):
        user, _ = User.objects.get_or_create(username=name, defaults={"is_staff": True, "first_name": name[6:].title()})
        user.groups.add(Group.objects.get(name=SUPPORT_AGENTS))
        agents.append(user)
    have = Review.objects.count()
    if have >= reviewed and not reseed:
        return counts()
    rng = random.Random(0)
    versions = [
        ModelVersion.objects.get_or_create(number=n, defaults={"base_model": "bench", "adapter_path": "/nonexistent"})[
            0
        ]
        for n in (1, 2, 3)
    ]
    now = timezone.now()
    batch = 1000

    def replies(count: int, *, state: str, source_pool: list[str]):
        """``count`` conversations, each a question and a bot reply with a queue entry."""
        made = []
        for start in range(0, count, batch):
            size = min(batch, count - start)
            with transaction.atomic():
                conversations = Conversation.objects.bulk_create(
                    [
                        Conversation(
                            session_key="",
                            status="closed",
                            segment=rng.choice(SEGMENTS),
                            started_at=now - timezone.timedelta(minutes=rng.randint(1, 60 * 24 * 30)),
                        )
                        for _ in range(size)
                    ]
                )
                questions = Message.objects.bulk_create(
                    [
                        Message(conversation=c, role="customer", body=rng.choice(QUESTIONS), created_at=c.started_at)
                        for c in conversations
                    ]
                )
                picks = [rng.randrange(len(QUESTIONS)) for _ in conversations]
                bots = Message.objects.bulk_create(
                    [
                        Message(
                            conversation=c,
                            role="bot",
                            body=f"Bench reply {start + i}: " + QUESTIONS[pick].lower(),
                            in_reply_to=q,
                            model_version=versions[i % 3],
                            mean_logprob=-rng.random() * 3,
                            latency_ms=rng.randint(200, 3000),
                            generation={"model_label": versions[i % 3].label, "intent": INTENTS[pick]},
                            helpful=rng.choice([True, False, None]),
                            created_at=c.started_at + timezone.timedelta(seconds=2),
                        )
                        for i, (c, q, pick) in enumerate(zip(conversations, questions, picks, strict=True))
                    ]
                )
                items = QueueItem.objects.bulk_create(
                    [
                        QueueItem(
                            kind="reply",
                            source=rng.choice(source_pool),
                            conversation=m.conversation,
                            message=m,
                            state=state,
                            model_version=m.model_version,
                            intent=m.generation["intent"],
                            segment=m.conversation.segment,
                            created_at=m.created_at,
                            resolved_at=now if state == "submitted" else None,
                        )
                        for m in bots
                    ]
                )
                made.extend(zip(bots, items, strict=True))
        return made

    done = replies(reviewed, state="submitted", source_pool=["sample", "not_helpful", "low_confidence", "flagged"])
    for start in range(0, len(done), batch):
        rows = []
        for bot, item in done[start : start + batch]:
            first = rng.choice(agents)
            good = rng.random() < 0.7
            rows.append(
                Review(
                    message=bot,
                    reviewer=first,
                    item=item,
                    good=good,
                    rating=rng.randint(3, 5) if good else rng.randint(1, 2),
                    verdict="approved" if good else "rejected",
                    model_version=bot.model_version,
                    created_at=now,
                )  # fmt: skip
            )
            if bot.pk % 10 == 0:  # double review
                second = rng.choice([a for a in agents if a != first])
                agree = rng.random() < 0.8
                rows.append(
                    Review(
                        message=bot,
                        reviewer=second,
                        good=good if agree else not good,
                        rating=rng.randint(1, 5),
                        verdict="approved" if (good if agree else not good) else "rejected",
                        model_version=bot.model_version,
                        created_at=now,
                    )  # fmt: skip
                )
        Review.objects.bulk_create(rows)
    replies(open_items, state="pending", source_pool=["sample", "not_helpful", "low_confidence", "flagged"])
    with transaction.atomic():
        waiting_conversations = Conversation.objects.bulk_create(
            [Conversation(session_key=f"bench-wait-{i}", status="waiting_for_agent") for i in range(waiting)]
        )
        Message.objects.bulk_create(
            [Message(conversation=c, role="customer", body="I need a person") for c in waiting_conversations]
        )
        QueueItem.objects.bulk_create(
            [QueueItem(kind="conversation", source="handoff", conversation=c) for c in waiting_conversations]
        )
    return counts()


def counts() -> dict:
    from conversations.models import Message, QueueItem, Review

    return {
        "reviews": Review.objects.count(),
        "reviewed_replies": Review.objects.values("message").distinct().count(),
        "bot_replies": Message.objects.filter(role="bot").count(),
        "queue_items": QueueItem.objects.count(),
        "open_queue_items": QueueItem.objects.filter(state__in=["pending", "draft"]).count(),
    }


def agent_cookie() -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username="bench-ann"))
    return client.cookies["sessionid"].value


def sample_item_id() -> int:
    from conversations.models import QueueItem

    return (
        QueueItem.objects.filter(state="pending", kind="reply")
        .order_by("created_at", "id")
        .values_list("pk", flat=True)[0]
    )


# --- the server -------------------------------------------------------------------------------


def start_server(database_url: str, work: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DJANGO_SETTINGS_MODULE="supportbot.settings",
        SUPPORTBOT_PRELOAD_MODEL="0",  # no model is served: the pages and the socket are measured
        DJANGO_DEBUG="0",
        DJANGO_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    port = free_port()
    log = open(work / "daphne.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "supportbot.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"daphne exited:\n{(work / 'daphne.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("daphne did not listen within 60 s")


# --- measuring ----------------------------------------------------------------------------------


def time_pages(base: str, cookie: str, paths: dict[str, str], requests: int) -> dict:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Cookie": f"sessionid={cookie}", "Host": f"{host}:{port}"}
    results = {}
    for name, path in paths.items():
        timings = []
        for i in range(requests + 3):
            started = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise SystemExit(f"GET {path} answered {response.status}: {body[:300]!r}")
            if i >= 3:  # the first requests warm the process up
                timings.append(elapsed)
        results[name] = {**summary(timings), "bytes": len(body)}
    connection.close()
    return results


async def time_socket(base: str, cookie: str, requests: int, item_id: int) -> dict:
    from websockets.asyncio.client import connect

    url = base.replace("http://", "ws://") + "/ws/agent/"
    headers = {"Cookie": f"sessionid={cookie}"}
    connects, counts_rt, renew_rt = [], [], []
    for i in range(requests + 3):
        started = time.perf_counter()
        async with connect(url, origin=base, additional_headers=headers, proxy=None, open_timeout=30) as ws:
            hello = json.loads(await ws.recv())
            elapsed = (time.perf_counter() - started) * 1000
            if hello.get("type") != "hello":
                raise SystemExit(f"Expected a hello frame, got {hello}")
            if i >= 3:
                connects.append(elapsed)
    async with connect(url, origin=base, additional_headers=headers, proxy=None, open_timeout=30) as ws:
        await ws.recv()
        for label, frame, reply_type, bucket in (
            ("counts", {"type": "counts"}, "hello", counts_rt),
            ("renew", {"type": "renew", "item": item_id}, "claim", renew_rt),
        ):
            for i in range(requests + 3):
                started = time.perf_counter()
                await ws.send(json.dumps(frame))
                while True:
                    answer = json.loads(await ws.recv())
                    if answer.get("type") in (reply_type, "error"):
                        break
                if answer["type"] == "error":
                    raise SystemExit(f"{label}: {answer}")
                if i >= 3:
                    bucket.append((time.perf_counter() - started) * 1000)
    return {
        "connect_until_hello": summary(connects),
        "counts_round_trip": summary(counts_rt),
        "renew_round_trip": summary(renew_rt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="Default: a SQLite file under var/bench/workspace/.")
    parser.add_argument("--reviewed", type=int, default=10_000, help="Reviewed bot replies in the database.")
    parser.add_argument("--open", type=int, default=500, help="Replies waiting in the queues.")
    parser.add_argument("--waiting", type=int, default=20, help="Conversations waiting for a human.")
    parser.add_argument("--requests", type=int, default=200, help="Timed requests per page and per socket action.")
    parser.add_argument("--reseed", action="store_true", help="Seed again even if the database holds enough rows.")
    args = parser.parse_args()

    work = ROOT / "var" / "bench" / "workspace"
    work.mkdir(parents=True, exist_ok=True)
    database_url = args.database_url or f"sqlite:///{work / 'bench.sqlite3'}"
    setup_django(database_url)
    from django.db import connection

    started = time.perf_counter()
    rows = seed(reviewed=args.reviewed, open_items=args.open, waiting=args.waiting, reseed=args.reseed)
    seeded_s = round(time.perf_counter() - started, 1)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")  # planner statistics, as autovacuum keeps them on a live database
    cookie, item_id = agent_cookie(), sample_item_id()
    connection.close()
    process, base = start_server(database_url, work)
    try:
        pages = time_pages(
            base,
            cookie,
            {
                "queue_all_open": "/agent/",
                "queue_one_source": "/agent/?source=flagged",
                "queue_search": "/agent/?q=parcel",
                "queue_submitted": "/agent/?state=submitted",
                "queue_filtered": "/agent/?model_version=2&segment=pro&intent=get_refund&state=all",
                "review_page": f"/agent/items/{item_id}/",
            },
            args.requests,
        )
        stats = time_pages(base, cookie, {"stats_page": "/agent/stats/"}, max(5, args.requests // 20))
        sockets = asyncio.run(time_socket(base, cookie, args.requests, item_id))
    finally:
        process.terminate()
        process.wait(10)
    print(
        json.dumps(
            {
                "database": connection.vendor,
                "channel_layer": "redis" if os.environ.get("REDIS_URL") else "in-memory",
                "rows": rows,
                "seed_s": seeded_s,
                "pages": pages,
                "reference": stats,
                "socket": sockets,
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
