"""What the chat gives fine-tuning: agents' feedback as training conversations, the prompt's roles."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from conversations.models import Message, Review
from conversations.selectors import feedback_training_examples
from tests.factories import MessageFactory, ReviewFactory, UserFactory, conversation_with_reply

pytestmark = pytest.mark.django_db


def test_feedback_selection_uses_each_replys_latest_review():
    customer = UserFactory(first_name="Jane", last_name="Doe", email="jane@example.com")
    _, approved = conversation_with_reply("Where is my order?", "It ships today.", customer=customer, segment="pro")
    _, corrected = conversation_with_reply("Can I pay by PayPal?", "No.")
    _, rejected = conversation_with_reply("Refund please", "Never.")
    _, overruled = conversation_with_reply("Hello", "Go away.")
    _, reconsidered = conversation_with_reply("Opening hours?", "9 to 5, Monday to Friday.")
    earlier = timezone.now() - timedelta(hours=1)
    agent = UserFactory(username="agent")

    good = ReviewFactory(reviewer=agent, message=approved, verdict=Review.Verdict.APPROVED, segment="pro")
    fix = ReviewFactory(
        message=corrected, verdict=Review.Verdict.CORRECTED, rating=2, corrected_body="Yes, PayPal works at checkout."
    )
    ReviewFactory(reviewer=agent, message=rejected, verdict=Review.Verdict.REJECTED, rating=1)
    ReviewFactory(reviewer=agent, message=overruled, verdict=Review.Verdict.APPROVED, created_at=earlier)
    ReviewFactory(reviewer=agent, message=overruled, verdict=Review.Verdict.REJECTED, rating=1)  # the later review wins
    ReviewFactory(reviewer=agent, message=reconsidered, verdict=Review.Verdict.REJECTED, rating=1, created_at=earlier)
    later = ReviewFactory(reviewer=agent, message=reconsidered, verdict=Review.Verdict.APPROVED)

    examples = {e.origin: e for e in feedback_training_examples()}
    assert set(examples) == {f"review:{good.id}", f"correction:{fix.id}", f"review:{later.id}"}
    approved_example = examples[f"review:{good.id}"]
    assert approved_example.messages == [
        {"role": "customer", "content": "Where is my order?"},
        {"role": "agent", "content": "It ships today."},
    ]
    assert approved_example.segment == "pro"
    assert approved_example.customer.name == "Jane Doe"
    assert approved_example.customer.email == "jane@example.com"
    assert examples[f"correction:{fix.id}"].messages[-1] == {
        "role": "agent",
        "content": "Yes, PayPal works at checkout.",
    }


def test_feedback_history_is_the_conversation_before_the_reply():
    conv, first_reply = conversation_with_reply("Hi", "Hello! How can I help?")
    base = first_reply.created_at
    MessageFactory(conversation=conv, role=Message.Role.SYSTEM, body="Agent joined", created_at=base)
    MessageFactory(
        conversation=conv, role=Message.Role.CUSTOMER, body="My parcel is late", created_at=base + timedelta(seconds=2)
    )
    MessageFactory(
        conversation=conv, role=Message.Role.AGENT, body="Which order?", created_at=base + timedelta(seconds=3)
    )
    MessageFactory(conversation=conv, role=Message.Role.CUSTOMER, body="A-1", created_at=base + timedelta(seconds=4))
    reply = MessageFactory(
        conversation=conv, role=Message.Role.BOT, body="A-1 arrives tomorrow.", created_at=base + timedelta(seconds=5)
    )
    MessageFactory(conversation=conv, role=Message.Role.CUSTOMER, body="Thanks", created_at=base + timedelta(seconds=6))
    ReviewFactory(message=reply, verdict=Review.Verdict.APPROVED)
    (example,) = feedback_training_examples()
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("customer", "Hi"),
        ("agent", "Hello! How can I help?"),
        ("customer", "My parcel is late"),
        ("agent", "Which order?"),
        ("customer", "A-1"),
        ("agent", "A-1 arrives tomorrow."),
    ]
