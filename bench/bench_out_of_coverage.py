"""Measure: can the retrieval score tell a question the knowledge has no answer for? (A finding; nothing uses it yet.)

Tried as a customer, the demo answered "Où est ma commande ? Elle n'est pas arrivée."
with a French address-change confirmation ("C'est fait : votre commande sera livrée à
votre adresse") and "How do I cancel my subscription?" with a cancel-order answer: the
demo's knowledge has no French tracking answer and no subscriptions, and the reply policy
sends the consensus of the nearest past answers whatever their distance (similarity 0.41
and 0.42 there; the correct refund answer that day had 0.34).

This simulates such questions on the Bitext exchanges: the intents of 90% of them (seeded
shuffle) form the knowledge, and each held-out question is asked twice, once against the
whole knowledge (in coverage) and once with its own intent removed from it (out of
coverage: any past answer sent is for another question). For thresholds on the top
neighbour's similarity (``RetrievalIndex`` cosine) and on word coverage (the IDF-weighted
share of the question's words found in the matched past question), it prints the share of
out-of-coverage questions a threshold would catch and the share of in-coverage questions it
would hand to a human needlessly; also the top neighbour's intent accuracy in coverage.

    .venv/bin/python bench/bench_out_of_coverage.py [--bitext PATH]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import bitext_path  # noqa: E402
from finetune.ml.retrieval import Exchange, RetrievalIndex  # noqa: E402

BITEXT = bitext_path()  # ../shared beside the checkout, or SUPPORTBOT_BITEXT_CSV
WORD_RE = re.compile(r"[^\W\d_]{3,}")
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def words(text: str) -> set[str]:
    return {w.lower() for w in WORD_RE.findall(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bitext", default=str(BITEXT))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with open(args.bitext, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(args.seed).shuffle(rows)
    cut = int(len(rows) * 0.9)
    known, asked = rows[:cut], rows[cut:]
    frequency = collections.Counter(w for r in known for w in words(r["instruction"]))

    def idf(word: str) -> float:
        return math.log((len(known) + 1) / (frequency.get(word, 0) + 1)) + 1

    def coverage(question: str, matched: str) -> float:
        mine = words(question)
        total = sum(idf(w) for w in mine)
        return sum(idf(w) for w in mine & words(matched)) / total if total else 1.0

    def exchanges(skip: str = ""):
        return [Exchange(r["instruction"], r["response"], r["intent"]) for r in known if r["intent"] != skip]

    whole = RetrievalIndex.build(exchanges())
    inside, outside, right = [], [], 0
    for r in asked:
        top = whole.search(r["instruction"], 1)[0]
        inside.append((top.score, coverage(r["instruction"], top.exchange.question)))
        right += top.exchange.intent == r["intent"]
    for intent in sorted({r["intent"] for r in asked}):
        without = RetrievalIndex.build(exchanges(skip=intent))
        for r in asked:
            if r["intent"] == intent:
                top = without.search(r["instruction"], 1)[0]
                outside.append((top.score, coverage(r["instruction"], top.exchange.question)))

    def table(column: int) -> list[dict]:
        return [
            {
                "below": t,
                "out_of_coverage_caught": round(sum(x[column] < t for x in outside) / len(outside), 3),
                "in_coverage_handed_off": round(sum(x[column] < t for x in inside) / len(inside), 3),
            }
            for t in THRESHOLDS
        ]

    print(  # noqa: T201
        json.dumps(
            {
                "knowledge": len(known),
                "questions": len(asked),
                "in_coverage_top1_intent_accuracy": round(right / len(asked), 3),
                "similarity": table(0),
                "word_coverage": table(1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
