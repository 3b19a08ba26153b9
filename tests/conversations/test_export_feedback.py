"""manage.py export_feedback: every review as CSV, JSON Lines or a Hugging Face dataset."""

from __future__ import annotations

import csv
import io
import json

import pytest
from datasets import load_from_disk
from django.core.management import call_command
from django.core.management.base import CommandError

from conversations.models import Message
from conversations.review import services as review
from tests.factories import bot_reply

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviews(agent, other_agent):
    reply = bot_reply(question="Where is my parcel?", body="It ships today.", mean_logprob=-0.1, latency_ms=99)
    Message.objects.filter(pk=reply.pk).update(helpful=False)
    item, _ = review.queue_item_add(message=reply, source="flagged")
    first = review.review_submit(
        agent=agent, message_id=reply.pk, item_id=item.pk, good=False, rating=2, reasons=["incorrect", "outdated"],
        note="Wrong date", correction="It ships tomorrow.",
    )  # fmt: skip
    second = review.review_submit(agent=other_agent, message_id=reply.pk, good=True, rating=4)
    return first, second


def test_csv_has_every_submission_with_its_values(reviews, tmp_path):
    first, second = reviews
    out = tmp_path / "feedback.csv"
    err = io.StringIO()
    call_command("export_feedback", "--format", "csv", "--out", str(out), stderr=err)
    assert f"Exported 2 reviews to {out}." in err.getvalue()
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [int(r["review_id"]) for r in rows] == [first.pk, second.pk]
    row = rows[0]
    assert (row["reviewer"], row["good"], row["score"], row["reasons"]) == ("sam", "false", "2", "incorrect;outdated")
    assert (row["note"], row["correction"], row["verdict"], row["queue"]) == (
        "Wrong date",
        "It ships tomorrow.",
        "corrected",
        "flagged",
    )
    assert (row["question"], row["reply"], row["customer_helpful"], row["latency_ms"]) == (
        "Where is my parcel?",
        "It ships today.",
        "false",
        "99",
    )
    assert (row["latest"], rows[1]["latest"]) == ("false", "true")
    assert row["training_status"] == "superseded"  # the later review replaced its candidate
    assert rows[1]["training_status"] == "pending"


def test_jsonl_to_standard_output_and_latest_only(reviews):
    out = io.StringIO()
    call_command("export_feedback", "--format", "jsonl", "--latest-only", stdout=out, stderr=io.StringIO())
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (record["review_id"], record["good"], record["score"], record["reasons"]) == (reviews[1].pk, True, 4, [])


def test_hf_writes_a_datasets_dataset(reviews, tmp_path):
    call_command("export_feedback", "--format", "hf", "--out", str(tmp_path / "ds"), stderr=io.StringIO())
    data = load_from_disk(str(tmp_path / "ds"))
    assert data.num_rows == 2
    assert data[0]["reasons"] == ["incorrect", "outdated"]
    assert data[0]["correction"] == "It ships tomorrow."
    assert data.features["score"].dtype == "int8"
    with pytest.raises(CommandError, match="not empty"):
        call_command("export_feedback", "--format", "hf", "--out", str(tmp_path / "ds"))
    with pytest.raises(CommandError, match="needs --out"):
        call_command("export_feedback", "--format", "hf")
    with pytest.raises(CommandError, match="--since must be a date"):
        call_command("export_feedback", "--format", "csv", "--since", "last week")
