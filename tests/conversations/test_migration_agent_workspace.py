"""The agent-workspace migration keeps earlier reviews' meaning and makes their feedback wait for approval."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("conversations", "0002_one_open_conversation")]
AFTER = [("conversations", "0003_agent_workspace")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture(autouse=True)
def _back_to_the_latest_schema():
    yield
    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


def test_earlier_reviews_become_pending_candidates_never_approved_ones():
    apps = migrate(BEFORE)
    Conversation = apps.get_model("conversations", "Conversation")
    Message = apps.get_model("conversations", "Message")
    Review = apps.get_model("conversations", "Review")
    User = apps.get_model("auth", "User")
    agent = User.objects.create(username="old-agent")
    conversation = Conversation.objects.create(session_key="m" * 32)
    now = timezone.now()

    def reply(body):
        return Message.objects.create(conversation=conversation, role="bot", body=body, status="complete")

    approved, corrected, rejected, changed = reply("a"), reply("b"), reply("c"), reply("d")
    Review.objects.create(message=approved, reviewer=agent, rating=5, verdict="approved")
    fix = Review.objects.create(message=corrected, reviewer=agent, rating=2, verdict="corrected", corrected_body="B!")
    Review.objects.create(message=rejected, reviewer=agent, rating=1, verdict="rejected")
    Review.objects.create(
        message=changed, reviewer=agent, rating=5, verdict="approved", created_at=now - timedelta(hours=1)
    )
    Review.objects.create(message=changed, reviewer=agent, rating=1, verdict="rejected", created_at=now)

    apps = migrate(AFTER)
    Review = apps.get_model("conversations", "Review")
    TrainingCandidate = apps.get_model("conversations", "TrainingCandidate")
    assert dict(Review.objects.values_list("verdict", "good").distinct()) == {
        "approved": True,
        "corrected": True,
        "rejected": False,
    }
    candidates = {c.message_id: c for c in TrainingCandidate.objects.all()}
    assert set(candidates) == {approved.pk, corrected.pk}  # the latest review of "d" rejected it
    assert {c.status for c in candidates.values()} == {"pending"}
    assert (candidates[corrected.pk].kind, candidates[corrected.pk].text, candidates[corrected.pk].review_id) == (
        "correction",
        "B!",
        fix.pk,
    )
    assert (candidates[approved.pk].kind, candidates[approved.pk].text) == ("approved_reply", "a")
