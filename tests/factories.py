"""factory_boy factories for the project's models."""

from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from conversations.models import Conversation, Message, Review
from finetune.models import DatasetVersion, ModelVersion, Ticket, TicketMessage, TrainingRun


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("correct-horse-battery")


class TicketFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Ticket

    source = "test"
    external_id = factory.Sequence(lambda n: f"T-{n}")
    subject = "Where is my order?"
    category = "ORDER"
    intent = "track_order"
    tags = factory.LazyFunction(lambda: ["B"])


class TicketMessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TicketMessage

    ticket = factory.SubFactory(TicketFactory)
    role = TicketMessage.Role.CUSTOMER
    body = "Where is my order?"
    position = factory.Sequence(lambda n: n)


class DatasetVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DatasetVersion

    name = factory.Sequence(lambda n: f"ds-{n}")
    path = factory.LazyAttribute(lambda d: f"/tmp/{d.name}")  # noqa: S108 - never read in these tests
    content_hash = factory.Sequence(lambda n: f"{n:064x}")


class TrainingRunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TrainingRun

    status = TrainingRun.Status.SUCCEEDED
    dataset_version = factory.SubFactory(DatasetVersionFactory)
    base_model = "tiny-gpt2"


class ModelVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelVersion

    number = factory.Sequence(lambda n: n + 1)
    base_model = "tiny-gpt2"
    adapter_path = factory.LazyAttribute(lambda v: f"/tmp/adapters/v{v.number}")  # noqa: S108
    status = ModelVersion.Status.CANDIDATE


class ConversationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Conversation

    session_key = factory.Sequence(lambda n: f"session{n:032d}")


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message

    conversation = factory.SubFactory(ConversationFactory)
    role = Message.Role.CUSTOMER
    body = "Hello"


class ReviewFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Review

    message = factory.SubFactory(MessageFactory, role=Message.Role.BOT)
    reviewer = factory.SubFactory(UserFactory)
    rating = 4
    verdict = Review.Verdict.APPROVED


def conversation_with_reply(customer_text: str, bot_text: str, **conversation) -> tuple[Conversation, Message]:
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
