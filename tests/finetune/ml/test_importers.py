"""Reading ticket files (plain Python, no database): formats, broken rows, wrong formats, streaming."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from finetune.ml.importers import (
    FIELD_LIMITS,
    MAX_BODY_CHARS,
    FormatError,
    ParsedTicket,
    RowError,
    parse_field_map,
    read_tickets,
)
from finetune.models import Ticket
from tests.finetune.fixtures import CSV_MAP, write_broken_csv


def split(items):
    tickets = [i for i in items if isinstance(i, ParsedTicket)]
    errors = [i for i in items if isinstance(i, RowError)]
    return tickets, errors


def test_bitext_file_reads_every_row(bitext_csv):
    tickets, errors = split(list(read_tickets(bitext_csv, "bitext")))
    assert errors == []
    assert len(tickets) == 3651
    first = tickets[0]
    assert first.external_id == "row-1"
    assert first.intent == "cancel_order"
    assert first.category == "ORDER"
    assert first.tags == ["B", "I", "L"]
    assert [m.role for m in first.messages] == ["customer", "agent"]
    assert first.messages[0].body == "how can I cancel purchase 113542617735902?"
    # The entity Bitext marks in the customer's text becomes a known customer identifier.
    assert first.customer_identifiers == [{"type": "order", "value": "113542617735902"}]
    assert len({t.external_id for t in tickets}) == 3651


def test_csv_with_broken_rows_keeps_the_good_ones_and_reports_lines(tmp_path):
    items = list(read_tickets(write_broken_csv(tmp_path / "t.csv"), "csv", field_map=CSV_MAP))
    tickets, errors = split(items)
    assert [t.external_id for t in tickets] == ["A1", "A2", "A8"]
    assert tickets[1].messages[0].body == "My parcel\nnever came, twice"
    assert tickets[1].tags == ["B", "Q"]
    assert tickets[0].customer_email == "a@example.com"
    assert tickets[0].created_at.isoformat() == "2024-05-01T09:30:00+00:00"
    assert tickets[1].created_at.tzinfo is not None  # a date without zone is taken as UTC
    assert [(e.line, e.code) for e in errors] == [
        (5, "missing_reply"),
        (6, "bad_encoding"),
        (7, "too_long"),
        (8, "bad_row"),
        (9, "bad_value"),
    ]
    assert "missing reply" in errors[0].reason
    assert f"the limit is {MAX_BODY_CHARS:,}" in errors[2].reason
    assert str(errors[4]).startswith("line 9: ")


def test_csv_without_ids_numbers_rows_stably(tmp_path):
    """Ids come from the record's position, broken records included, so fixing one shifts nothing."""
    path = tmp_path / "t.csv"
    path.write_text("q,a\nHi?,Hello.\nBroken?,\nBye?,Bye.\n")
    tickets, errors = split(list(read_tickets(path, "csv", field_map={"customer_message": "q", "agent_reply": "a"})))
    assert [t.external_id for t in tickets] == ["row-1", "row-3"]
    assert [e.line for e in errors] == [3]


def test_jsonl_threads_and_broken_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [
        {
            "external_id": "J1",
            "intent": "track_order",
            "tags": ["P"],
            "customer_identifiers": [{"type": "order", "value": "A-1"}, "ACC-9"],
            "channel": "email",
            "messages": [
                {"role": "customer", "body": "Where is my order?"},
                {"role": "agent", "body": "Which order?"},
                {"role": "user", "body": "A-1"},
                {"role": "assistant", "body": "It ships today."},
            ],
        },
        {"external_id": "J2", "messages": [{"role": "customer", "body": "Hello?"}]},
        {"external_id": "J3", "messages": [{"role": "bot", "body": "Hi"}, {"role": "agent", "body": "x"}]},
        {"external_id": "J4", "messages": [{"role": "customer", "body": "a"}, {"role": "agent", "body": "  "}]},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(1, "")  # blank lines are ignored
    lines.append('{"external_id": "J5", "messages": [')  # truncated JSON
    lines.append(
        json.dumps(
            {"external_id": "J6", "messages": [{"role": "customer", "body": "ok"}, {"role": "agent", "body": "fine"}]}
        )
    )
    path.write_text("\n".join(lines) + "\n")
    tickets, errors = split(list(read_tickets(path, "jsonl")))
    assert [t.external_id for t in tickets] == ["J1", "J6"]
    thread = tickets[0]
    assert [m.role for m in thread.messages] == ["customer", "agent", "customer", "agent"]
    assert thread.customer_identifiers == [{"type": "order", "value": "A-1"}, "ACC-9"]
    assert thread.metadata == {"extra": {"channel": "email"}}  # unknown fields are kept
    assert [(e.line, e.code) for e in errors] == [
        (3, "missing_reply"),
        (4, "unknown_role"),
        (5, "missing_reply"),
        (6, "bad_json"),
    ]
    assert "'bot'" in errors[1].reason


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (b"", "jsonl", "empty"),
        (b"", "bitext", "empty"),
        (b"context,instruction,response\n", "bitext", "lacks the column(s) 'intent', 'category'"),
        (b'{"external_id": "1", "messages": []}\n', "bitext", "looks like JSON; use --format jsonl"),
        (b"instruction,response,intent,category\nhi,hello,x,y\n", "jsonl", "use --format csv or bitext"),
        (b'[{"messages": []}]\n', "jsonl", "JSON list"),
        (b'{"id": 1, "text": "hello"}\n', "jsonl", "no 'messages' list"),
        (gzip.compress(b'{"messages": []}\n' * 50), "jsonl", "not UTF-8"),
        (b"id,question\n1,hi\n", "csv", "lacks the column(s) 'answer'"),
    ],
)
def test_a_file_of_another_format_fails_before_yielding_anything(tmp_path, content, fmt, message):
    path = tmp_path / "file"
    path.write_bytes(content)
    field_map = {"customer_message": "question", "agent_reply": "answer"} if fmt == "csv" else None
    reader = read_tickets(path, fmt, field_map=field_map)
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        next(reader)


def test_bitext_file_as_jsonl_fails(bitext_csv):
    with pytest.raises(FormatError, match="not a JSONL file"):
        list(read_tickets(bitext_csv, "jsonl"))


def test_field_map_parsing():
    assert parse_field_map(["customer_message=q,agent_reply=a", "intent = topic"]) == {
        "customer_message": "q",
        "agent_reply": "a",
        "intent": "topic",
    }
    with pytest.raises(ValueError, match="unknown field 'question'"):
        parse_field_map(["question=q"])
    with pytest.raises(ValueError, match="not FIELD=COLUMN"):
        parse_field_map(["customer_message"])
    with pytest.raises(ValueError, match="needs --map for agent_reply"):
        next(read_tickets(Path("unused.csv"), "csv", field_map={"customer_message": "q"}))


def test_field_limits_match_the_ticket_model():
    for name, limit in FIELD_LIMITS.items():
        field = Ticket._meta.get_field(name)
        if field.max_length is not None:
            assert field.max_length == limit, name


def test_reading_streams_in_constant_memory(tmp_path):
    """A file ~40x bigger than the reader's peak allocation is read: nothing accumulates per record."""
    path = tmp_path / "big.jsonl"
    record = {
        "messages": [
            {"role": "customer", "body": "Where is my order? " * 10},
            {"role": "agent", "body": "It ships today. " * 20},
        ]
    }
    line = (json.dumps(record) + "\n").encode()
    with path.open("wb") as handle:
        for _ in range(20_000):
            handle.write(line)
    size = path.stat().st_size
    tracemalloc.start()
    count = 0
    for item in read_tickets(path, "jsonl"):
        assert isinstance(item, ParsedTicket)
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 20_000
    assert peak < size / 40, f"peak {peak:,} bytes while reading {size:,}"


def test_an_over_long_line_is_skipped_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("finetune.ml.importers.MAX_LINE_BYTES", 1000)
    good = {"messages": [{"role": "customer", "body": "Hi"}, {"role": "agent", "body": "Hello"}]}
    huge = {"messages": [{"role": "customer", "body": "x" * 5000}, {"role": "agent", "body": "ok"}]}
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, huge, good)) + "\n")
    tickets, errors = split(list(read_tickets(path, "jsonl")))
    assert [t.line for t in tickets] == [1, 3]
    assert [(e.line, e.code) for e in errors] == [(2, "too_long")]
    assert [t.external_id for t in tickets] == ["row-1", "row-3"]

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("q,a\nHi,Hello\n" + "x" * 5000 + ",y\nBye,Bye\n")
    tickets, errors = split(
        list(read_tickets(csv_path, "csv", field_map={"customer_message": "q", "agent_reply": "a"}))
    )
    assert [t.line for t in tickets] == [2, 4]
    assert [(e.line, e.code) for e in errors] == [(3, "too_long")]

    path.write_text(json.dumps(huge) + "\n")
    with pytest.raises(FormatError, match="one JSON document rather than one ticket per line"):
        next(read_tickets(path, "jsonl"))
