"""Benchmark: `manage.py import_tickets` on files of growing size; peak RSS must not grow with them.

Issue 3 asks the import to stream its file, in constant memory even on a 1 GB file. This
writes ticket files of each requested size, imports each one into a fresh database with
the real command in a child process, samples the child's RSS every 0.2 s, and reports
file size, tickets, tickets/s and peak RSS per size as JSON (var/bench/import.json).
Constant memory means the peak at 1 GB is about the peak at the smallest size.

The rows come from the shared Bitext CSV when it is there (real support exchanges,
repeated until the file has the size; each row gets its own id from its position), or
else from the project's sample-ticket generator. ``--format jsonl`` writes multi-turn
threads from the generator instead.

Without DATABASE_URL (or --database-url) each size imports into a fresh SQLite file under
var/bench/, never the demo database; with PostgreSQL the bench's source is deleted first.

    .venv/bin/python bench/bench_import.py                          # 16, 128, 1024 MB, bitext
    .venv/bin/python bench/bench_import.py --sizes-mb 8,64 --format jsonl
    .venv/bin/python bench/bench_import.py --database-url postgres://postgres@127.0.0.1:5432/sb_bench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SOURCE = "bench-import"
BITEXT_CSV = ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv"
MB = 1 << 20


def _bitext_rows(seed: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows in the Bitext layout: the shared file's, or generated ones."""
    if BITEXT_CSV.is_file():
        with BITEXT_CSV.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            return header, list(reader)
    from make_sample_tickets import INTENTS, make_ticket

    rng, start = random.Random(seed), datetime(2023, 1, 1, tzinfo=UTC)
    header = ["instruction", "response", "intent", "category", "tags"]
    rows = []
    for i, intent in enumerate(list(INTENTS) * 40):
        ticket = make_ticket(rng, i + 1, intent, start)
        customer = next(m["body"] for m in ticket["messages"] if m["role"] == "customer")
        agent = [m["body"] for m in ticket["messages"] if m["role"] == "agent"][-1]
        rows.append([customer, agent, ticket["intent"], ticket["category"], "".join(ticket["tags"])])
    return header, rows


def write_file(path: Path, size_mb: int, fmt: str, seed: int) -> dict:
    """Write a ticket file of about ``size_mb`` MiB; return its size and record count."""
    target, records = size_mb * MB, 0
    started = time.perf_counter()
    if fmt == "bitext":
        header, rows = _bitext_rows(seed)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            while handle.tell() < target:
                for row in rows:
                    writer.writerow(row)
                    records += 1
                    if records % 1000 == 0 and handle.tell() >= target:
                        break
    else:
        from make_sample_tickets import INTENTS, make_ticket

        rng, start, intents = random.Random(seed), datetime(2023, 1, 1, tzinfo=UTC), list(INTENTS)
        with path.open("w", encoding="utf-8") as handle:
            while handle.tell() < target:
                ticket = make_ticket(rng, records + 1, intents[records % len(intents)], start)
                ticket["external_id"] = f"J-{records + 1:08d}"
                handle.write(json.dumps(ticket, ensure_ascii=False) + "\n")
                records += 1
    return {
        "file_mb": round(path.stat().st_size / MB, 1),
        "records": records,
        "write_s": round(time.perf_counter() - started, 1),
    }


def _env(database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, DJANGO_SETTINGS_MODULE="supportbot.settings", PYTHONPATH=str(ROOT))
    return env


def _manage(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, **kwargs)


def import_file(path: Path, fmt: str, database_url: str, log_path: Path) -> dict:
    """Import ``path`` with the real command in a child process; sample its memory."""
    import psutil

    env = _env(database_url)
    _manage(env, "migrate", "--verbosity", "0")
    delete = f"from finetune.models import Ticket; Ticket.objects.filter(source={SOURCE!r}).delete()"
    _manage(env, "shell", "-c", delete)
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "manage.py", "import_tickets", str(path), "--format", fmt, "--source", SOURCE],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        process = psutil.Process(child.pid)
        peak, samples = 0, []
        while child.poll() is None:
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                break
            peak = max(peak, rss)
            samples.append((round(time.perf_counter() - started, 1), round(rss / MB)))
            time.sleep(0.2)
        child.wait()
    elapsed = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"import_tickets failed ({child.returncode}); see {log_path}")
    counted = _manage(
        env,
        "shell",
        "-c",
        f"from finetune.models import Ticket; print(Ticket.objects.filter(source={SOURCE!r}).count())",
        capture_output=True,
        text=True,
    )
    tickets = int(counted.stdout.strip().splitlines()[-1])
    # RSS at each quarter of the run: flat when the import streams.
    quarters = [samples[min(len(samples) - 1, int(len(samples) * q))][1] for q in (0.25, 0.5, 0.75, 0.99) if samples]
    return {
        "tickets": tickets,
        "import_s": round(elapsed, 1),
        "tickets_per_s": round(tickets / elapsed),
        "peak_rss_mb": round(peak / MB),
        "rss_mb_at_quarters": quarters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="16,128,1024", help="File sizes to import, in MiB (comma-separated).")
    parser.add_argument("--format", dest="fmt", choices=["bitext", "jsonl"], default="bitext")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-files", action="store_true", help="Keep the generated files in var/bench/.")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "import.json")
    args = parser.parse_args()

    bench_dir = ROOT / "var" / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for size in [int(s) for s in args.sizes_mb.split(",") if s.strip()]:
        path = bench_dir / f"import-{size}mb.{'csv' if args.fmt == 'bitext' else 'jsonl'}"
        written = write_file(path, size, args.fmt, args.seed)
        database_url = args.database_url
        if not database_url:
            sqlite = bench_dir / f"import-{size}mb.sqlite3"
            sqlite.unlink(missing_ok=True)
            database_url = f"sqlite:///{sqlite}"
        try:
            measured = import_file(path, args.fmt, database_url, bench_dir / f"import-{size}mb.log")
        finally:
            if not args.keep_files:
                path.unlink(missing_ok=True)
                if not args.database_url:
                    Path(database_url.removeprefix("sqlite:///")).unlink(missing_ok=True)
        row = {"size_mb": size, "format": args.fmt, **written, **measured}
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "import_tickets",
        "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
