"""Write review rows (``selectors.feedback_export_rows``) as CSV, JSON Lines or a Hugging Face dataset.

Plain Python: rows in, files or text out; ``manage.py export_feedback`` and the
workspace's download button both use these.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("csv", "jsonl", "hf")
# A spreadsheet runs a cell starting with one of these as a formula; customers and
# agents typed this text, so CSV cells that start so get a leading apostrophe.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ";".join(str(v) for v in value)
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def csv_chunks(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Iterator[str]:
    """The CSV text, header first, a row at a time (for streaming a download). Lists are joined with ';'."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
        yield buffer.getvalue()


def jsonl_chunks(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Iterator[str]:
    for row in rows:
        yield json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False) + "\n"


def hf_features(columns: Sequence[str]):
    """Column types of the ``hf`` export (a ``datasets.Features``)."""
    from datasets import Features, List, Value

    kinds = {
        "review_id": Value("int64"),
        "message_id": Value("int64"),
        "score": Value("int8"),
        "latency_ms": Value("int64"),
        "good": Value("bool"),
        "latest": Value("bool"),
        "customer_helpful": Value("bool"),
        "confidence": Value("float64"),
        "reasons": List(Value("string")),
    }
    return Features({c: kinds.get(c, Value("string")) for c in columns})


def write_hf(rows: Iterable[dict[str, Any]], columns: Sequence[str], out_dir: str | Path) -> int:
    """Save the rows as a ``datasets.Dataset`` (``save_to_disk``) in ``out_dir``; returns the row count."""
    from datasets import Dataset

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out.")
    records = [{c: row.get(c) for c in columns} for row in rows]
    dataset = Dataset.from_list(records, features=hf_features(columns))
    dataset.save_to_disk(str(out))
    return len(records)
