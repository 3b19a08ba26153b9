"""factory_boy factories for the project's models."""

from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from conversations.models import Conversation, Message, QueueItem, Review, TrainingCandidate
from finetune.models import DatasetVersion, ModelVersion, Ticket, TicketMessage, TrainingRun
from supportbot.roles import roles_sync


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


class TrainingCandidateFactory(factory.django.DjangoModelFactory):
    """A pending candidate made from a review (as ``review_submit`` makes one)."""

    class Meta:
        model = TrainingCandidate

    review = factory.SubFactory(ReviewFactory)
    message = factory.LazyAttribute(lambda c: c.review.message)
    reviewer = factory.LazyAttribute(lambda c: c.review.reviewer)
    kind = factory.LazyAttribute(
        lambda c: (
            TrainingCandidate.Kind.CORRECTION if c.review.corrected_body else TrainingCandidate.Kind.APPROVED_REPLY
        )
    )
    text = factory.LazyAttribute(lambda c: c.review.corrected_body or c.review.message.body)


class QueueItemFactory(factory.django.DjangoModelFactory):
    """A queue entry for a bot reply (``review.services.queue_item_add`` is the real way in)."""

    class Meta:
        model = QueueItem

    message = factory.SubFactory(MessageFactory, role=Message.Role.BOT)
    conversation = factory.LazyAttribute(lambda i: i.message.conversation)
    kind = QueueItem.Kind.REPLY
    source = QueueItem.Source.FLAGGED


def staff_user(role: str, username: str, **fields):
    """A staff user in one of the roles (``supportbot.roles``), groups synced first."""
    roles_sync()
    user = UserFactory(username=username, is_staff=True, **fields)
    user.groups.add(Group.objects.get(name=role))
    return user


def bot_reply(
    *,
    conversation: Conversation | None = None,
    question: str = "Where is my order?",
    body: str = "Your order ships today.",
    **fields,
) -> Message:
    """A customer's question and the bot's finished reply to it (no queue entry: services add those)."""
    conversation = conversation or ConversationFactory()
    asked = MessageFactory(conversation=conversation, role=Message.Role.CUSTOMER, body=question)
    return MessageFactory(
        conversation=conversation,
        role=Message.Role.BOT,
        body=body,
        in_reply_to=asked,
        status=Message.Status.COMPLETE,
        **fields,
    )
