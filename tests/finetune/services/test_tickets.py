"""ticket_import: files into Ticket rows, idempotently, skipping and reporting broken rows."""

from __future__ import annotations

import json

import pytest
from django.db import connection

from finetune.models import Ticket, TicketMessage
from finetune.services.tickets import MAX_PROBLEMS_KEPT, ticket_import
from supportbot.errors import ApplicationError
from tests.finetune.fixtures import CSV_MAP, write_broken_csv

pytestmark = pytest.mark.django_db


def test_bitext_import_stores_every_row_with_intents_and_tags(bitext_csv):
    summary = ticket_import(path=bitext_csv, fmt="bitext")
    assert (summary.created, summary.updated, summary.unchanged, summary.skipped) == (3651, 0, 0, 0)
    assert Ticket.objects.filter(source="bitext").count() == 3651
    assert TicketMessage.objects.count() == 2 * 3651
    assert Ticket.objects.values("intent").distinct().count() == 27
    assert Ticket.objects.values("category").distinct().count() == 11
    ticket = Ticket.objects.get(source="bitext", external_id="row-1")
    assert (ticket.intent, ticket.category, ticket.tags) == ("cancel_order", "ORDER", ["B", "I", "L"])
    assert ticket.customer_identifiers == [{"type": "order", "value": "113542617735902"}]
    assert [(m.position, m.role) for m in ticket.messages.all()] == [(0, "customer"), (1, "agent")]
    assert ticket.messages.first().body == "how can I cancel purchase 113542617735902?"
    tags = [tag for tags in Ticket.objects.values_list("tags", flat=True) for tag in tags]
    assert set(tags) >= {"B", "I", "L", "P", "Q", "Z", "K"}


def test_a_long_import_keeps_no_query_log_with_debug_on(bitext_csv, settings):
    """DEBUG keeps each query's SQL (all the tickets' text): the import clears it per batch."""
    settings.DEBUG = True
    summary = ticket_import(path=bitext_csv, fmt="bitext", batch_size=100)
    assert summary.created == 3651
    # One batch's queries at most, not the 37 batches' (each batch is a handful of queries).
    assert len(connection.queries) < 20


def test_reimporting_the_same_file_creates_nothing(bitext_csv):
    ticket_import(path=bitext_csv, fmt="bitext")
    before = dict(Ticket.objects.values_list("external_id", "updated_at"))
    messages_before = set(TicketMessage.objects.values_list("id", flat=True))
    summary = ticket_import(path=bitext_csv, fmt="bitext")
    assert (summary.created, summary.updated, summary.unchanged, summary.skipped) == (0, 0, 3651, 0)
    assert Ticket.objects.count() == 3651
    assert dict(Ticket.objects.values_list("external_id", "updated_at")) == before
    assert set(TicketMessage.objects.values_list("id", flat=True)) == messages_before


def test_a_changed_row_is_updated_in_place(tmp_path, sample_tickets):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    lines = sample_tickets.read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][-1]["body"] = "A better answer."
    record["intent"] = "complaint"
    changed = tmp_path / "sample.jsonl"
    changed.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    ticket_id = Ticket.objects.get(source="sample", external_id=record["external_id"]).id

    summary = ticket_import(path=changed, fmt="jsonl", source="sample")
    assert (summary.created, summary.updated, summary.unchanged) == (0, 1, len(lines) - 1)
    ticket = Ticket.objects.get(source="sample", external_id=record["external_id"])
    assert ticket.id == ticket_id
    assert ticket.intent == "complaint"
    assert ticket.messages.last().body == "A better answer."
    assert ticket.messages.count() == len(record["messages"])


def test_sample_tickets_import(sample_tickets):
    summary = ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    assert summary.created == 330
    assert summary.skipped == 0
    assert Ticket.objects.values("intent").distinct().count() == 11
    assert set(Ticket.objects.values_list("customer_segment", flat=True)) == {"free", "pro", "enterprise"}
    assert Ticket.objects.filter(messages__position=3).distinct().count() > 10  # multi-turn threads


def test_broken_rows_are_skipped_and_reported_by_line(tmp_path):
    reported = []
    summary = ticket_import(
        path=write_broken_csv(tmp_path / "export.csv"), fmt="csv", field_map=CSV_MAP, on_problem=reported.append
    )
    assert (summary.created, summary.skipped) == (3, 5)
    assert summary.source == "export"
    assert sorted(Ticket.objects.values_list("external_id", flat=True)) == ["A1", "A2", "A8"]
    assert [p.line for p in reported] == [5, 6, 7, 8, 9]
    assert [p.line for p in summary.problems] == [5, 6, 7, 8, 9]
    assert summary.skipped_by_reason == {
        "missing_reply": 1,
        "bad_encoding": 1,
        "too_long": 1,
        "bad_row": 1,
        "bad_value": 1,
    }


def test_a_file_in_another_format_imports_nothing(bitext_csv):
    with pytest.raises(ApplicationError, match="not a JSONL file.*Nothing was imported"):
        ticket_import(path=bitext_csv, fmt="jsonl")
    assert Ticket.objects.count() == 0


def test_missing_file_and_bad_map_are_refused(tmp_path):
    with pytest.raises(ApplicationError, match="does not exist"):
        ticket_import(path=tmp_path / "nope.csv", fmt="bitext")
    path = tmp_path / "t.csv"
    path.write_text("q,a\nhi,hello\n")
    with pytest.raises(ApplicationError, match="needs --map for agent_reply"):
        ticket_import(path=path, fmt="csv", field_map={"customer_message": "q"})


def test_a_repeated_id_in_one_file_keeps_the_later_row_and_warns(tmp_path):
    path = tmp_path / "dupes.jsonl"
    rows = [
        {"external_id": "D1", "messages": [{"role": "customer", "body": "v1"}, {"role": "agent", "body": "a1"}]},
        {"external_id": "D2", "messages": [{"role": "customer", "body": "x"}, {"role": "agent", "body": "y"}]},
        {"external_id": "D1", "messages": [{"role": "customer", "body": "v2"}, {"role": "agent", "body": "a2"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = ticket_import(path=path, fmt="jsonl", batch_size=10)
    assert (summary.created, summary.updated) == (2, 1)
    assert summary.warnings == ["line 3: external id 'D1' also appears on line 1; this later row replaced it"]
    assert summary.repeated_ids == 1
    assert Ticket.objects.get(external_id="D1").messages.first().body == "v2"


def test_a_file_of_repeated_ids_keeps_a_bounded_list_of_warnings(tmp_path):
    path = tmp_path / "many-dupes.jsonl"
    row = {"external_id": "SAME", "messages": [{"role": "customer", "body": "q"}, {"role": "agent", "body": "a"}]}
    path.write_text((json.dumps(row) + "\n") * (MAX_PROBLEMS_KEPT + 50))
    summary = ticket_import(path=path, fmt="jsonl", batch_size=10)
    assert summary.repeated_ids == MAX_PROBLEMS_KEPT + 49
    assert len(summary.warnings) == MAX_PROBLEMS_KEPT
    assert Ticket.objects.filter(external_id="SAME").count() == 1
