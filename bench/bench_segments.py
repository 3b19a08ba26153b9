"""Benchmark: accuracy and speed of the segment labels (register and language); prints JSON.

Register detector (``finetune.ml.segments``) against the Bitext sample's register
tags: the sample is split in two halves with a fixed seed; the rules were tuned
looking at the first ("dev") half only, and the second ("test") half is the honest
figure. Per register: support, predicted, precision, recall, F1; "plain" means no
register tag. Language detector: accuracy on every Bitext customer message (all
English) and on the hand-written multilingual sample
``tests/finetune/ml/data/language_sample.tsv``. Speed: ms per message for
``message_segments`` on the Bitext messages, word lists already loaded.

    .venv/bin/python bench/bench_segments.py
    SUPPORTBOT_BITEXT_CSV=path/to/customer_support_tickets.csv .venv/bin/python bench/bench_segments.py --split dev
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.ml.segments import (  # noqa: E402
    default_language_detector,
    message_segments,
    register_scores,
    registers_from_bitext_tags,
)

SEED = 12  # the split the docs report; changing it changes which half is "test"
LANGUAGE_SAMPLE = ROOT / "tests" / "finetune" / "ml" / "data" / "language_sample.tsv"


def bitext_csv() -> Path:
    for candidate in (
        os.environ.get("SUPPORTBOT_BITEXT_CSV", ""),
        ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv",
        "/work/shared/data/bitext/customer_support_tickets.csv",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit("The Bitext sample is not available: set SUPPORTBOT_BITEXT_CSV to customer_support_tickets.csv")


def load_bitext() -> list[tuple[str, str]]:
    with bitext_csv().open(newline="", encoding="utf-8") as handle:
        return [(row["instruction"], row["tags"]) for row in csv.DictReader(handle)]


def split(rows: list, seed: int = SEED) -> dict[str, list]:
    """Two halves, shuffled with ``seed``: "dev" (looked at while writing the rules) and "test"."""
    order = np.random.default_rng(seed).permutation(len(rows))
    half = len(rows) // 2
    return {"dev": [rows[i] for i in order[:half]], "test": [rows[i] for i in order[half:]]}


def bitext_register_scores(rows: list[tuple[str, str]]) -> dict:
    return register_scores([text for text, _ in rows], [registers_from_bitext_tags(tags) for _, tags in rows])


def language_scores(bitext_texts: list[str]) -> dict:
    detector = default_language_detector()
    sample = [
        line.rstrip("\n").split("\t", 1)
        for line in LANGUAGE_SAMPLE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    per_language: dict[str, list[int]] = {}
    errors = []
    for language, text in sample:
        found = detector.detect(text)
        per_language.setdefault(language, [0, 0])
        per_language[language][0] += found == language
        per_language[language][1] += 1
        if found != language:
            errors.append({"text": text, "expected": language, "detected": found})
    english = sum(1 for text in bitext_texts if detector.detect(text) == "en")
    return {
        "multilingual_sample": {
            "n": len(sample),
            "languages": len(per_language),
            "accuracy": round(sum(c for c, _ in per_language.values()) / len(sample), 3),
            "per_language": {lang: f"{c}/{n}" for lang, (c, n) in sorted(per_language.items())},
            "errors": errors,
        },
        "bitext_english": {"n": len(bitext_texts), "accuracy": round(english / len(bitext_texts), 4)},
    }


def speed(texts: list[str]) -> dict:
    message_segments("warm up the word lists")
    start = time.perf_counter()
    for text in texts:
        message_segments(text)
    elapsed = time.perf_counter() - start
    return {"messages": len(texts), "ms_per_message": round(1000 * elapsed / len(texts), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test", "both"], default="both")
    args = parser.parse_args()
    rows = load_bitext()
    halves = split(rows)
    report: dict = {"seed": SEED, "registers": {}}
    for name in ("dev", "test") if args.split == "both" else (args.split,):
        report["registers"][name] = bitext_register_scores(halves[name])
    texts = [text for text, _ in rows]
    report["language"] = language_scores(texts)
    report["speed"] = speed(texts)
    print(json.dumps(report, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
