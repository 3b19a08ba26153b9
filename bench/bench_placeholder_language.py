"""Measure: English neutral words in non-English replies, and English replies unchanged, before vs after
the filler wrote neutral words in the conversation's language; prints JSON.

"Before" is ``finetune/serving/placeholders.py`` as it stands at ``--before`` (a git
revision: 69011db, the last commit before the language tables, gave the figures in
docs/benchmarks.md), loaded from ``git show``; "after" is the working tree's. Two sets
of replies, each filled with neutral words only (no company facts, no customer values:
the slots nobody could fill):

- the demo's sample tickets (``finetune/fixtures/sample_tickets*.jsonl``), redacted as
  the dataset builder redacts them (the customer's own name, order number and address
  become ``{{NAME}}``, ``{{ORDER_ID}}``, ``{{ADDRESS}}``), each agent answer filled in
  the language of the customer turns before it (``placeholders.reply_language``);
  counted: non-English answers whose filled text gains English filler words;
- the Bitext answers (``../shared/data/bitext/customer_support_tickets.csv``, English):
  filled as English, before and after must be byte-identical; also filled in the
  language detected from each question, as the served path would, to show how many a
  misdetected question changes.

    .venv/bin/python bench/bench_placeholder_language.py --before 69011db
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import bitext_path  # noqa: E402
from finetune.ml.dataset_builder import conversations_from_file, conversations_from_jsonl  # noqa: E402
from finetune.ml.redaction import redact  # noqa: E402
from finetune.serving import placeholders as after  # noqa: E402

BITEXT = bitext_path()  # ../shared beside the checkout, or SUPPORTBOT_BITEXT_CSV
FIXTURES = sorted((ROOT / "finetune" / "fixtures").glob("sample_tickets*.jsonl"))
# Words only the English filler writes into a French, Spanish or German reply.
ENGLISH_FILLER_RE = re.compile(
    r"(?i)\b(?:your|our|there|customer|during business hours|a few days|the applicable amount|"
    r"the date shown|you provided|order number|invoice number|tracking number)\b"
)


def _load_before(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:finetune/serving/placeholders.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "placeholders_before.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("placeholders_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _english_words_added(raw: str, filled: str) -> bool:
    return len(ENGLISH_FILLER_RE.findall(filled)) > len(ENGLISH_FILLER_RE.findall(raw))


def sample_tickets(before) -> dict:
    answers = Counter()
    examples = []
    for path in FIXTURES:
        for conversation in conversations_from_jsonl(path):
            turns = [
                {"role": m["role"], "content": redact(m["content"], conversation.customer).text}
                for m in conversation.messages
            ]
            for number, turn in enumerate(turns):
                if turn["role"] != "agent":
                    continue
                language = after.reply_language(turns[:number])
                if language == "en":
                    continue
                old = before.fill_placeholders(turn["content"])
                new = after.fill_placeholders(turn["content"], language=language)
                answers["non_english"] += 1
                answers["with_slots"] += "{{" in turn["content"]
                answers["english_words_before"] += _english_words_added(turn["content"], old)
                answers["english_words_after"] += _english_words_added(turn["content"], new)
                if "{{" in turn["content"] and len(examples) < 2:
                    examples.append({"raw": turn["content"], "before": old, "after": new})
    return {**answers, "examples": examples}


def bitext(before) -> dict:
    counts = Counter()
    for item in conversations_from_file(BITEXT, "bitext", source="bitext"):
        question = item.messages[0]["content"]
        answer = item.messages[-1]["content"]
        old = before.fill_placeholders(answer)
        counts["answers"] += 1
        counts["with_slots"] += bool(before._SLOT_RE.search(answer))
        counts["identical_as_english"] += old == after.fill_placeholders(answer, language="en")
        counts["identical_language_unset"] += old == after.fill_placeholders(answer)
        language = after.reply_language([{"role": "customer", "content": question}])
        counts[f"question_language_{language}"] += 1
        counts["changed_with_detected_language"] += old != after.fill_placeholders(answer, language=language)
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the filler to compare with")
    args = parser.parse_args()
    before = _load_before(args.before)
    print(
        json.dumps({"sample_tickets": sample_tickets(before), "bitext": bitext(before)}, ensure_ascii=False, indent=1)
    )  # noqa: T201


if __name__ == "__main__":
    main()
