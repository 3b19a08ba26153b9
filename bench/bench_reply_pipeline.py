"""Benchmark: what the reply pipeline costs per token and how far it lags the model; prints JSON.

Every Bitext agent reply (``../shared/data/bitext/customer_support_tickets.csv``, or
``SUPPORTBOT_BITEXT_CSV``) is streamed through ``finetune.serving.safety.ReplyPipeline``
(repetition guard, personal-data filter, placeholder filler with demo company facts
and the customer's own values) in 4-character pieces, about a GPT-2/SmolLM2 token.
Reported: microseconds of pipeline work per piece (mean, p99 of replies' means),
how far the shown text lags what the model wrote (characters held, mean over every
piece), pieces until the first text is shown, and replies that showed a template slot
(must be 0). A second pass streams each reply followed by itself (a model that says its
answer twice) and counts how many were cut and how many showed the repeat.

    .venv/bin/python bench/bench_reply_pipeline.py --limit 500
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.serving.safety import ReplyPipeline, ReplyPlan, reply_maskers  # noqa: E402

FACTS = {
    "company_name": "Acme",
    "support_phone": "0800 555 0199",
    "support_email": "help@acme.example",
    "website_url": "https://acme.example",
    "support_hours": "Monday to Friday, 9:00-17:00",
}
SLOT_RE = re.compile(r"\{\{|\}\}|\[[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}\](?!\()")
PIECE = 4


def stream(text: str, question: str) -> dict:
    pipeline = ReplyPipeline(
        ReplyPlan(maskers=reply_maskers(), facts=FACTS), [{"role": "customer", "content": question}]
    )
    shown, lags, first = "", [], None
    started = time.perf_counter()
    pieces = 0
    for i in range(0, len(text), PIECE):
        shown += pipeline.push(text[i : i + PIECE])
        pieces += 1
        if first is None and shown:
            first = pieces
        lags.append(min(i + PIECE, len(text)) - len(shown))
        if pipeline.stop_engine:
            break
    done = type("Done", (), {"finish_reason": "stop", "mean_logprob": None})()
    shown += pipeline.finish(done)
    seconds = time.perf_counter() - started
    return {
        "us_per_piece": seconds * 1e6 / max(pieces, 1),
        "lag_chars": statistics.mean(lags) if lags else 0.0,
        "first_piece": first or pieces,
        "slot": bool(SLOT_RE.search(shown)),
        "cut": pipeline.guard.cut,
        "shown": shown,
    }


def bitext_csv() -> Path:
    for candidate in (
        os.environ.get("SUPPORTBOT_BITEXT_CSV", ""),
        ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv",
        "/work/shared/data/bitext/customer_support_tickets.csv",
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise SystemExit("The Bitext sample is not available: set SUPPORTBOT_BITEXT_CSV to customer_support_tickets.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500, help="replies to stream (0: all)")
    args = parser.parse_args()
    with bitext_csv().open(newline="", encoding="utf-8") as handle:
        rows = [(r["instruction"], r["response"]) for r in csv.DictReader(handle)]
    rows = rows[: args.limit] if args.limit else rows
    once = [stream(reply, question) for question, reply in rows]
    twice = [stream(reply + " " + reply, question) for question, reply in rows]
    means = sorted(r["us_per_piece"] for r in once)
    print(
        json.dumps(
            {
                "replies": len(rows),
                "mean_reply_chars": round(statistics.mean(len(r) for _, r in rows)),
                "us_per_piece_mean": round(statistics.mean(means), 1),
                "us_per_piece_p99": round(means[int(0.99 * (len(means) - 1))], 1),
                "lag_chars_mean": round(statistics.mean(r["lag_chars"] for r in once), 1),
                "first_text_after_pieces_median": statistics.median(r["first_piece"] for r in once),
                "replies_showing_a_slot": sum(r["slot"] for r in once),
                "clean_replies_cut": sum(r["cut"] for r in once),
                "said_twice_cut": sum(r["cut"] for r in twice),
                "said_twice_shown_twice": sum(
                    r["shown"].count(reply.strip()[:60]) > 1 for r, (_, reply) in zip(twice, rows, strict=True)
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
