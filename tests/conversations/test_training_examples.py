"""Which feedback a dataset build learns from (``training_examples_approved``, behind finetune's selector)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import Message, TrainingCandidate
from finetune.selectors import training_examples_from_feedback
from tests.factories import ConversationFactory, MessageFactory, ReviewFactory, TrainingCandidateFactory

pytestmark = pytest.mark.django_db


def test_an_example_is_the_conversation_before_the_reply_without_notices():
    conversation = ConversationFactory()
    base = timezone.now()

    def say(role, body, seconds):
        return MessageFactory(
            conversation=conversation, role=role, body=body, created_at=base + timedelta(seconds=seconds)
        )

    say(Message.Role.CUSTOMER, "Hi", 0)
    say(Message.Role.BOT, "Hello! How can I help?", 1)
    say(Message.Role.SYSTEM, "Sam from the support team joined the chat.", 1)
    say(Message.Role.CUSTOMER, "My parcel is late", 2)
    say(Message.Role.AGENT, "Which order?", 3)
    say(Message.Role.CUSTOMER, "A-1", 4)
    reply = say(Message.Role.BOT, "A-1 arrives tomorrow.", 5)
    say(Message.Role.CUSTOMER, "Thanks", 6)
    review = ReviewFactory(message=reply)
    TrainingCandidateFactory(review=review, status=TrainingCandidate.Status.APPROVED)

    (example,) = training_examples_from_feedback()
    assert example.origin == f"review:{review.pk}"
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("customer", "Hi"),
        ("agent", "Hello! How can I help?"),
        ("customer", "My parcel is late"),
        ("agent", "Which order?"),
        ("customer", "A-1"),
        ("agent", "A-1 arrives tomorrow."),
    ]


@pytest.mark.parametrize("status", ["pending", "rejected", "superseded"])
def test_candidates_that_are_not_approved_never_train(status):
    TrainingCandidateFactory(status=status)
    assert list(training_examples_from_feedback()) == []


def test_since_keeps_recent_reviews_only():
    old = ReviewFactory(created_at=timezone.now() - timedelta(days=10))
    new = ReviewFactory()
    for review in (old, new):
        TrainingCandidateFactory(review=review, status=TrainingCandidate.Status.APPROVED)
    since = timezone.now() - timedelta(days=1)
    assert [e.origin for e in training_examples_from_feedback(since=since)] == [f"review:{new.pk}"]
