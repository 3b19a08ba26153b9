"""dataset_version_build: tickets and agent feedback in, a recorded (or reused) dataset version out."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import load_from_disk

from conversations.models import Review, TrainingCandidate
from finetune.models import DatasetVersion, Ticket
from finetune.selectors import training_system_prompt
from finetune.services.datasets import dataset_version_build
from finetune.services.tickets import ticket_import
from supportbot.errors import ApplicationError
from tests.factories import ReviewFactory, TrainingCandidateFactory, UserFactory, conversation_with_reply

pytestmark = pytest.mark.django_db


def test_build_records_a_dataset_version_with_feedback(dataset_settings, sample_tickets):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    _, reply = conversation_with_reply("Do you sell gift cards?", "Yes, in any amount from 10 to 500.")
    review = ReviewFactory(message=reply, verdict=Review.Verdict.APPROVED)
    _, wrong = conversation_with_reply("Do you ship to Mars?", "Yes.")
    correction = ReviewFactory(
        message=wrong, verdict=Review.Verdict.CORRECTED, rating=1, corrected_body="Sorry, we only ship on Earth."
    )
    _, unapproved = conversation_with_reply("Do you ship to the Moon?", "Yes.")
    pending = ReviewFactory(message=unapproved, verdict=Review.Verdict.APPROVED)
    builder = UserFactory(username="modeladmin")
    # Feedback reaches a dataset only once a model admin approved it (conversations' TrainingCandidate).
    TrainingCandidateFactory(review=review, status=TrainingCandidate.Status.APPROVED)
    TrainingCandidateFactory(review=correction, status=TrainingCandidate.Status.APPROVED)
    TrainingCandidateFactory(review=pending)

    version = dataset_version_build(seed=5, created_by=builder)

    assert DatasetVersion.objects.get() == version
    assert version.created_by == builder
    assert Path(version.path).parent == dataset_settings.SUPPORTBOT_DATASET_DIR
    assert version.tokenizer == str(Path(dataset_settings.SUPPORTBOT_BASE_MODEL).resolve())
    assert len(version.content_hash) == 64
    assert version.content_hash == version.card["content_hash"]
    assert version.num_train + version.num_validation == version.card["num_train"] + version.card["num_validation"]
    assert version.params["seed"] == 5
    assert version.params["built_by"] == "modeladmin"
    data = load_from_disk(version.path)
    assert data["train"].num_rows == version.num_train
    assert data["validation"].num_rows == version.num_validation
    origins = set(data["train"]["origin"]) | set(data["validation"]["origin"])
    assert {f"review:{review.id}", f"correction:{correction.id}"} <= origins
    assert f"review:{pending.id}" not in origins
    assert version.card["origins"]["review"] == 1
    assert version.card["origins"]["correction"] == 1
    assert data["train"][0]["messages"][0] == {"role": "system", "content": training_system_prompt()}


def test_rebuilding_identical_content_reuses_the_version(dataset_settings, sample_tickets):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    first = dataset_version_build(max_examples=40)
    again = dataset_version_build(max_examples=40)
    assert again == first
    assert DatasetVersion.objects.count() == 1
    assert [p.name for p in dataset_settings.SUPPORTBOT_DATASET_DIR.iterdir()] == [first.name]
    other = dataset_version_build(max_examples=40, seed=1)
    assert other != first
    assert other.content_hash != first.content_hash


def test_build_options_and_failures(dataset_settings, sample_tickets, tmp_path):
    with pytest.raises(ApplicationError, match="No conversations to build from: import tickets first"):
        dataset_version_build()
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    with pytest.raises(ApplicationError, match="validation fraction must be at least 0 and below 1") as refused:
        dataset_version_build(val_fraction=1.5)
    assert refused.value.extra == {"field": "val_fraction"}  # interfaces name their own input for it
    with pytest.raises(ApplicationError, match="could not be found"):
        dataset_version_build(base_model=str(tmp_path / "no-such-model"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(ApplicationError, match="not empty"):
        dataset_version_build(out_dir=taken)
    assert DatasetVersion.objects.count() == 0

    out = tmp_path / "june"
    cutoff = Ticket.objects.order_by("created_at")[300].created_at
    version = dataset_version_build(out_dir=out, since=cutoff, include_feedback=False, system_prompt=False)
    assert version.name == "june"
    assert version.path == str(out.resolve())
    assert version.card["conversations_seen"] == Ticket.objects.filter(created_at__gte=cutoff).count()
    assert load_from_disk(str(out))["train"][0]["messages"][0]["role"] == "customer"
