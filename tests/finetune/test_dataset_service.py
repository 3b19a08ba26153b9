"""dataset_version_build and the selectors feeding it: tickets, agent feedback, the recorded version."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from datasets import load_from_disk
from django.utils import timezone

from conversations.models import BotProfile, Message, Review, TrainingCandidate
from finetune.models import DatasetVersion, Ticket
from finetune.selectors import ticket_conversations, training_system_prompt
from finetune.services import dataset_version_build, ticket_import
from supportbot.errors import ApplicationError
from tests.factories import ConversationFactory, MessageFactory, ReviewFactory, TrainingCandidateFactory, UserFactory

pytestmark = pytest.mark.django_db


def chat(customer_text: str, bot_text: str, **conversation):
    """A live conversation: a customer message and the bot's reply to it."""
    conv = ConversationFactory(**conversation)
    now = timezone.now()
    question = MessageFactory(conversation=conv, role=Message.Role.CUSTOMER, body=customer_text, created_at=now)
    reply = MessageFactory(
        conversation=conv,
        role=Message.Role.BOT,
        body=bot_text,
        in_reply_to=question,
        created_at=now + timedelta(seconds=1),
    )
    return conv, reply


def test_system_prompt_is_the_chats():
    assert training_system_prompt() == (
        "You are the customer support assistant of Acme. Answer briefly and politely. "
        "If you are not sure, offer to connect the customer with a human agent."
    )
    BotProfile.objects.create(company_name="Globex", system_prompt="You help {company} customers. Use {{EMAIL}} as is.")
    assert training_system_prompt() == "You help Globex customers. Use {{EMAIL}} as is."


def test_ticket_conversations_stream_in_id_order(sample_tickets):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    conversations = list(ticket_conversations())
    assert len(conversations) == 330
    first = Ticket.objects.order_by("id").first()
    assert conversations[0].origin == f"ticket:sample:{first.external_id}"
    assert conversations[0].customer.email == first.customer_email
    assert [m["content"] for m in conversations[0].messages] == list(first.messages.values_list("body", flat=True))
    cutoff = Ticket.objects.order_by("created_at")[100].created_at
    assert len(list(ticket_conversations(since=cutoff))) == Ticket.objects.filter(created_at__gte=cutoff).count()
    ticket_import(path=sample_tickets, fmt="jsonl", source="copy")
    assert len(list(ticket_conversations())) == 660
    assert {c.origin.split(":")[1] for c in ticket_conversations(sources=["copy"])} == {"copy"}


def test_build_records_a_dataset_version_with_feedback(dataset_settings, sample_tickets):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    _, reply = chat("Do you sell gift cards?", "Yes, in any amount from 10 to 500.")
    review = ReviewFactory(message=reply, verdict=Review.Verdict.APPROVED)
    _, wrong = chat("Do you ship to Mars?", "Yes.")
    correction = ReviewFactory(
        message=wrong, verdict=Review.Verdict.CORRECTED, rating=1, corrected_body="Sorry, we only ship on Earth."
    )
    _, unapproved = chat("Do you ship to the Moon?", "Yes.")
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
    with pytest.raises(ApplicationError, match="--val-fraction"):
        dataset_version_build(val_fraction=1.5)
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


def test_admin_lists_dataset_versions(dataset_settings, sample_tickets, admin_client):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    version = dataset_version_build(max_examples=30)
    response = admin_client.get("/admin/finetune/datasetversion/")
    assert response.status_code == 200
    assert version.name in response.content.decode()
    detail = admin_client.get(f"/admin/finetune/datasetversion/{version.pk}/change/")
    assert detail.status_code == 200
    assert version.content_hash in detail.content.decode()
