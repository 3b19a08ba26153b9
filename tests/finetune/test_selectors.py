"""Read-side queries of fine-tuning: tickets as conversations, the chat's data, runs and versions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from conversations.models import BotProfile, Review, TrainingCandidate
from finetune import providers
from finetune.models import ModelVersion, Ticket, TrainingRun
from finetune.selectors import (
    dataset_version_latest,
    model_version_active,
    model_version_comparison,
    model_version_of_run,
    ticket_conversations,
    ticket_count,
    training_examples_from_feedback,
    training_run_live,
    training_run_progress,
    training_system_prompt,
)
from finetune.services.tickets import ticket_import
from tests.factories import (
    DatasetVersionFactory,
    ModelVersionFactory,
    ReviewFactory,
    TicketFactory,
    TrainingCandidateFactory,
    TrainingRunFactory,
    conversation_with_reply,
)

pytestmark = pytest.mark.django_db


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


def test_system_prompt_is_the_chats():
    assert training_system_prompt() == (
        "You are the customer support assistant of Acme. Answer briefly and politely. "
        "If you are not sure, offer to connect the customer with a human agent."
    )
    BotProfile.objects.create(company_name="Globex", system_prompt="You help {company} customers. Use {{EMAIL}} as is.")
    assert training_system_prompt() == "You help Globex customers. Use {{EMAIL}} as is."


def test_ticket_count_filters_like_the_conversations():
    old = TicketFactory(source="a", created_at=timezone.now() - timedelta(days=10))
    TicketFactory(source="a")
    TicketFactory(source="b")
    assert ticket_count() == 3
    assert ticket_count(sources=["a"]) == 2
    assert ticket_count(since=old.created_at + timedelta(days=1)) == 2
    assert ticket_count(since=old.created_at + timedelta(days=1), sources=["b"]) == 1


def test_the_chat_data_comes_from_the_chat_apps_providers(monkeypatch):
    """finetune reads feedback and the prompt only through what conversations registered at start-up."""
    _, reply = conversation_with_reply("Do you sell gift cards?", "Yes, from 10 to 500.")
    review = ReviewFactory(message=reply, verdict=Review.Verdict.APPROVED)
    TrainingCandidateFactory(review=review, status=TrainingCandidate.Status.APPROVED)  # a model admin approved it
    assert [e.origin for e in training_examples_from_feedback()] == [f"review:{review.id}"]
    assert [e.origin for e in training_examples_from_feedback(since=timezone.now() + timedelta(minutes=1))] == []

    monkeypatch.setattr(providers, "_chat_data", providers.ChatData())  # as without the chat app
    assert list(training_examples_from_feedback()) == []
    assert training_system_prompt() is None


def test_active_version_latest_dataset_and_live_run():
    assert model_version_active() is None
    assert dataset_version_latest() is None
    assert training_run_live() is None
    ModelVersionFactory(status=ModelVersion.Status.RETIRED)
    active = ModelVersionFactory(status=ModelVersion.Status.ACTIVE)
    TrainingRunFactory(status=TrainingRun.Status.SUCCEEDED)
    other_lane = TrainingRunFactory(status=TrainingRun.Status.QUEUED, lane="nightly")
    newest = DatasetVersionFactory()
    DatasetVersionFactory(created_at=timezone.now() - timedelta(days=1))
    assert model_version_active() == active
    assert dataset_version_latest() == newest
    assert training_run_live() is None  # the default lane has none
    assert training_run_live("nightly") == other_lane
    assert training_run_live(lane=None) == other_lane


def test_run_progress_reads_the_row_and_its_version():
    run = TrainingRunFactory(
        status=TrainingRun.Status.SUCCEEDED,
        progress=1.0,
        current_step=10,
        total_steps=10,
        loss_history=[{"step": 5, "epoch": 0.5, "loss": 2.5}, {"step": 10, "epoch": 1.0, "loss": 1.75}],
        log_tail="12:00:00 Started",
    )
    assert model_version_of_run(run) is None
    data = training_run_progress(run, version_url=lambda v: f"/v/{v.pk}")
    assert (data["status"], data["is_live"], data["last_loss"], data["loss_points"]) == ("succeeded", False, 1.75, 2)
    assert data["version"] is None
    version = ModelVersionFactory(training_run=run)
    assert model_version_of_run(run) == version
    data = training_run_progress(run, version_url=lambda v: reverse("admin:finetune_modelversion_change", args=[v.pk]))
    assert data["version"] == {
        "label": version.label,
        "status": "Candidate",
        "url": f"/admin/finetune/modelversion/{version.pk}/change/",
    }


def test_comparison_sets_a_candidate_beside_the_active_version():
    active = ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE,
        metrics={"eval_loss": 1.5, "validation_fingerprint": "set-a", "rouge_l": 0.30, "num_train": 900},
    )
    candidate = ModelVersionFactory(
        metrics={"eval_loss": 1.2, "validation_fingerprint": "set-a", "rouge_l": 0.25, "num_train": 1000}
    )
    rows = {row.label: row for row in model_version_comparison(candidate)}
    loss = rows["Validation loss"]
    assert (loss.candidate, loss.active, loss.better, loss.note) == (1.2, 1.5, True, "")
    assert (loss.candidate_text, loss.active_text) == ("1.2000", "1.5000")
    assert rows["ROUGE-L of generated replies"].better is False  # higher is better, and it is lower
    assert rows["Training examples"].better is None  # not a quality metric
    assert rows["Training examples"].candidate_text == "1,000"
    assert rows["Validation perplexity"].candidate_text == "—"  # not measured

    # Losses on different validation sets are not compared, unless the active one was scored on this set.
    elsewhere = ModelVersionFactory(metrics={"eval_loss": 1.0, "validation_fingerprint": "set-b"})
    loss = {row.label: row for row in model_version_comparison(elsewhere)}["Validation loss"]
    assert (loss.better, loss.note) == (None, "measured on different validation sets")
    scored = ModelVersionFactory(
        metrics={"eval_loss": 1.0, "validation_fingerprint": "set-b", "reference_losses": {str(active.pk): 0.9}}
    )
    loss = {row.label: row for row in model_version_comparison(scored)}["Validation loss"]
    assert (loss.active, loss.better) == (0.9, False)
    assert loss.note == f"{active.label} scored on this version's validation set"

    # The active version compared with itself shows no other side.
    assert all(row.active is None for row in model_version_comparison(active))
