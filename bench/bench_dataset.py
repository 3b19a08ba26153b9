"""Benchmark: build a dataset from N generated tickets; report tickets/s and peak RSS as JSON.

Generates N tickets (source "bench", default 100,000) from the sample-ticket templates
with extra variation, into the configured database, then runs the real service
(``finetune.services.datasets.dataset_version_build``) in a fresh child process, whose peak RSS
(and its worker processes') is the build's own. Target (issue 3): at least 2,000
tickets/s and peak RSS under 1 GB on two cores.

Without DATABASE_URL the tickets go to a SQLite file of their own (var/bench/bench.sqlite3),
never into the demo database.

    .venv/bin/python bench/bench_dataset.py                       # 100,000 tickets, base model from settings
    .venv/bin/python bench/bench_dataset.py --tickets 5000 --base-model tiny --workers 1
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sb_bench .venv/bin/python bench/bench_dataset.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SOURCE = "bench"
PRODUCTS = ["jacket", "blender", "phone case", "desk lamp", "kettle", "backpack", "router", "sofa cushion"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _django(database_url: str | None) -> None:
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    elif not os.environ.get("DATABASE_URL"):
        bench_dir = ROOT / "var" / "bench"
        bench_dir.mkdir(parents=True, exist_ok=True)
        os.environ["DATABASE_URL"] = f"sqlite:///{bench_dir / 'bench.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import django

    django.setup()


def generate(count: int, seed: int) -> dict:
    """Replace the bench tickets with ``count`` new ones; return timing."""
    from django.core.management import call_command
    from django.db import transaction
    from make_sample_tickets import INTENTS, make_ticket

    from finetune.models import Ticket, TicketMessage

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    Ticket.objects.filter(source=SOURCE).delete()
    rng = random.Random(seed)
    intents = list(INTENTS)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    batch_size = 2000
    for offset in range(0, count, batch_size):
        tickets, threads = [], []
        for i in range(offset, min(count, offset + batch_size)):
            record = make_ticket(rng, i + 1, intents[i % len(intents)], start)
            # Variation beyond the templates, so deduplication keeps most tickets, as real data would.
            extra = f" I ordered {rng.randint(1, 9)} {rng.choice(PRODUCTS)} on {rng.choice(DAYS)}"
            record["messages"][0]["body"] += f"{extra}, {rng.randint(2, 28)} days ago."
            ticket = Ticket(
                source=SOURCE,
                external_id=f"B-{i + 1:07d}",
                intent=record["intent"],
                category=record["category"],
                tags=record["tags"],
                customer_segment=record["customer_segment"],
                customer_name=record["customer_name"],
                customer_email=record["customer_email"],
                customer_phone=record["customer_phone"],
                customer_address=record["customer_address"],
                customer_identifiers=record["customer_identifiers"],
                created_at=datetime.fromisoformat(record["created_at"]),
            )
            tickets.append(ticket)
            threads.append(record["messages"])
        with transaction.atomic():
            Ticket.objects.bulk_create(tickets)
            TicketMessage.objects.bulk_create(
                TicketMessage(ticket=t, role=m["role"], body=m["body"], position=p)
                for t, messages in zip(tickets, threads, strict=True)
                for p, m in enumerate(messages)
            )
    return {"tickets": count, "generate_s": round(time.perf_counter() - started, 1)}


class _MemorySampler(threading.Thread):
    """Peak memory of this process and its worker processes, sampled every ``interval`` seconds.

    ``peak_total`` counts this process's RSS plus each worker's unique memory (USS):
    forked workers share the parent's pages (libraries, tokenizer), and adding their
    RSS would count those pages once per worker. ``peak_rss_sum`` adds plain RSS anyway.
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak_rss_sum = 0
        # Linux splits RSS into anonymous memory (the heap) and file pages (here mostly the
        # memory-mapped Arrow files datasets reads back while saving): the latter is page
        # cache the kernel can drop, the former is what the build really holds.
        self.peak_anon = 0
        self.peak_file = 0
        self.stop = threading.Event()

    def _status(self) -> tuple[int, int]:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
            )
            return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return 0, 0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                main = self.process.memory_info().rss
                total, rss_sum = main, main
                for child in self.process.children(recursive=True):
                    try:
                        total += child.memory_full_info().uss
                        rss_sum += child.memory_info().rss
                    except psutil.Error:
                        pass
                anon, file_pages = self._status()
                self.peak_anon = max(self.peak_anon, anon)
                self.peak_file = max(self.peak_file, file_pages)
                self.peak_total = max(self.peak_total, total)
                self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
            except psutil.Error:
                pass
            self.stop.wait(self.interval)


def build(base_model: str | None, workers: int | None, out_dir: Path) -> dict:
    """Run in a fresh process: build the dataset from the bench tickets and measure it."""
    from finetune.selectors import ticket_count
    from finetune.services.datasets import dataset_version_build

    tickets = ticket_count(sources=[SOURCE])
    sampler = _MemorySampler()
    sampler.start()
    started = time.perf_counter()
    version = dataset_version_build(
        out_dir=out_dir,
        sources=[SOURCE],
        base_model=base_model,
        workers=workers,
        include_feedback=False,
    )
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    result = {
        "tickets": tickets,
        "examples": version.num_train + version.num_validation,
        "build_s": round(seconds, 2),
        "tickets_per_s": round(tickets / seconds, 1),
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_total_mb": round(sampler.peak_total / 2**20, 1),
        "peak_rss_sum_mb": round(sampler.peak_rss_sum / 2**20, 1),
        "peak_rss_main_anon_mb": round(sampler.peak_anon / 2**20, 1),
        "peak_rss_main_file_mb": round(sampler.peak_file / 2**20, 1),
        "workers": version.params.get("workers"),
        "tokenizer": version.tokenizer,
        "template": version.card.get("template"),
        "dropped": version.card.get("dropped"),
        "token_p50": version.card["token_lengths"]["input"].get("p50"),
    }
    version.delete()  # the files are the bench's temporary folder
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=100_000, help="tickets to generate (default 100000)")
    parser.add_argument(
        "--base-model",
        default=None,
        help="tokenizer: 'tiny' (a GPT-2-style tokenizer built here), 'smollm2', a path or Hub id; "
        "default SUPPORTBOT_BASE_MODEL",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="build worker processes (default: the service's auto)"
    )
    parser.add_argument("--database-url", help="database to use (default DATABASE_URL, else var/bench/bench.sqlite3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the bench tickets already there if the count matches"
    )
    parser.add_argument("--phase", choices=["all", "build"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _django(args.database_url)

    if args.phase == "build":
        print(json.dumps(build(args.base_model, args.workers, args.out)))
        return

    from finetune.selectors import ticket_count

    summary: dict = {"database": os.environ["DATABASE_URL"].split("@")[-1], "cpu_count": os.cpu_count()}
    if args.reuse and ticket_count(sources=[SOURCE]) == args.tickets:
        summary["generate_s"] = 0
    else:
        summary.update(generate(args.tickets, args.seed))
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        base_model = args.base_model
        if base_model == "tiny":
            from make_sample_tickets import make_tickets

            from finetune.ml.tiny import build_tiny_causal_lm

            corpus = [m["body"] for t in make_tickets(330, 3) for m in t["messages"]]
            base_model = str(build_tiny_causal_lm(Path(tmp) / "tiny", corpus=corpus, vocab_size=4096))
        command = [sys.executable, __file__, "--phase", "build", "--out", str(Path(tmp) / "dataset")]
        if base_model:
            command += ["--base-model", base_model]
        if args.workers is not None:
            command += ["--workers", str(args.workers)]
        child = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ.copy())
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"build failed with exit code {child.returncode}")
        summary.update(json.loads(child.stdout.strip().splitlines()[-1]))
        shutil.rmtree(Path(tmp) / "dataset", ignore_errors=True)
    summary["base_model_arg"] = args.base_model or "settings"
    summary["target"] = {"tickets_per_s": 2000, "peak_rss_mb": 1024}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
