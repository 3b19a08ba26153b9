"""Segment labels written with the messages, and each finished reply's ReplyOutcome row (bias monitoring)."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from conversations import services
from conversations.models import Message, ReplyOutcome, Review
from conversations.review import services as review_services
from finetune.ml import segments
from finetune.models import Ticket
from finetune.serving.interface import GenerationDone
from supportbot.roles import SUPPORT_AGENTS
from tests.factories import (
    ConversationFactory,
    MessageFactory,
    ModelVersionFactory,
    TicketFactory,
    TicketMessageFactory,
    staff_user,
)

pytestmark = pytest.mark.django_db

OWNER = "test-host:1:abc"


def done(text="Your order ships today, thanks for waiting.", logprob=-0.5, label="v1") -> GenerationDone:
    return GenerationDone(
        text=text,
        finish_reason="stop",
        token_count=7,
        mean_logprob=logprob,
        model_label=label,
        first_token_ms=12,
        latency_ms=80,
    )


def answered(conversation, text: str, *, intent: str = "track_order", client_id: str = "c1") -> Message:
    services.message_create_customer(conversation=conversation, client_id=client_id, text=text)
    reply, _ = services.bot_reply_start(
        conversation=conversation, model_label="v1", params={"intent": intent}, owner=OWNER
    )
    return services.bot_reply_finish(message_id=reply.pk, done=done(), seq=1)


def test_a_customer_message_is_labelled_when_saved():
    conversation = ConversationFactory(segment="enterprise")
    message, _ = services.message_create_customer(
        conversation=conversation, client_id="c1", text="can u help me cancel my order pls"
    )
    message.refresh_from_db()
    expected = segments.message_segments("can u help me cancel my order pls")
    assert message.registers == expected["registers"]
    assert "colloquial" in message.registers
    assert message.register == expected["register"] == "colloquial"
    assert message.language == "en"
    assert message.segmenter_version == segments.SEGMENTER_VERSION


def test_a_detector_failure_saves_the_message_unlabelled(monkeypatch):
    def broken(text):
        raise RuntimeError("word list missing")

    monkeypatch.setattr(segments, "message_segments", broken)
    message, created = services.message_create_customer(
        conversation=ConversationFactory(), client_id="c1", text="Where is my parcel?"
    )
    message.refresh_from_db()
    assert created
    assert message.body == "Where is my parcel?"
    assert message.segmenter_version is None
    assert message.registers == []


def test_a_finished_reply_records_the_segments_of_the_customer_it_answered():
    ModelVersionFactory(number=1)
    conversation = ConversationFactory(segment="enterprise")
    reply = answered(conversation, "WHERE IS MY DAMN ORDER", intent="track_order")
    outcome = ReplyOutcome.objects.get(message=reply)
    asked = reply.in_reply_to
    asked.refresh_from_db()
    assert asked.intent == "track_order"  # the intent became known when the bot answered
    assert outcome.model_version.label == "v1"
    assert outcome.register == asked.register == "offensive"
    assert outcome.reg_offensive
    assert not outcome.reg_polite
    assert (outcome.page_segment, outcome.intent, outcome.language) == ("enterprise", "track_order", "en")
    assert outcome.reply_words == 7
    assert outcome.latency_ms == 80
    assert (outcome.reviewed, outcome.bad, outcome.handoff, outcome.helpful) == (False, None, False, None)


def test_review_helpful_and_handoff_update_the_outcome():
    ModelVersionFactory(number=1)
    agent = staff_user(SUPPORT_AGENTS, "agent1")
    conversation = ConversationFactory(segment="pro")
    reply = answered(conversation, "Could you please tell me where my order is?")
    review_services.review_submit(
        agent=agent,
        message_id=reply.pk,
        good=False,
        rating=2,
        reasons=["incorrect", "biased"],
        correction="Your order left the warehouse yesterday.",
    )
    services.csat_record(conversation=conversation, message_id=reply.pk, helpful=False)
    services.message_create_customer(conversation=conversation, client_id="c2", text="I want to talk to a human agent")
    outcome = ReplyOutcome.objects.get(message=reply)
    assert (outcome.reviewed, outcome.bad, outcome.rating, outcome.corrected) == (True, True, 2, True)
    assert outcome.reason_incorrect
    assert outcome.reason_biased
    assert not outcome.reason_outdated
    assert outcome.helpful is False
    assert outcome.handoff  # the keyword handed the chat to a person after this reply
    assert outcome.reg_polite


def test_only_the_latest_review_counts():
    ModelVersionFactory(number=1)
    agent = staff_user(SUPPORT_AGENTS, "agent1")
    reply = answered(ConversationFactory(), "where is my order")
    review_services.review_submit(agent=agent, message_id=reply.pk, good=False, rating=1, reasons=["incorrect"])
    review_services.review_submit(agent=agent, message_id=reply.pk, good=True, rating=5)
    outcome = ReplyOutcome.objects.get(message=reply)
    assert (outcome.bad, outcome.rating, outcome.reason_incorrect) == (False, 5, False)


def test_every_review_reason_has_a_column():
    columns = {field.name for field in ReplyOutcome._meta.get_fields()}
    assert {f"reason_{reason}" for reason in Review.Reason.values} <= columns
    assert {f"reg_{name}" for name in segments.REGISTER_LABELS} <= columns


def test_backfill_labels_old_rows_and_derives_outcomes():
    ModelVersionFactory(number=1)
    conversation = ConversationFactory(segment="free")
    asked = MessageFactory(conversation=conversation, body="I'd like to cancel my order, please")
    reply = MessageFactory(
        conversation=conversation,
        role=Message.Role.BOT,
        status=Message.Status.COMPLETE,
        body="I have cancelled it.",
        in_reply_to=asked,
        generation={"intent": "cancel_order", "model_label": "v1"},
    )
    failed = MessageFactory(conversation=conversation, role=Message.Role.BOT, status=Message.Status.FAILED)
    tagged = TicketFactory(tags=["B", "Q", "Z"])
    untagged = TicketFactory(tags=[])
    TicketMessageFactory(ticket=untagged, body="WHERE IS MY DAMN ORDER", position=0)
    Ticket.objects.update(segmenter_version=None, registers=[], register="")
    call_command("monitoring_backfill", verbosity=0)
    asked.refresh_from_db()
    reply.refresh_from_db()
    assert asked.segmenter_version == segments.SEGMENTER_VERSION
    assert asked.register == "polite"
    assert reply.intent == "cancel_order"
    assert asked.intent == "cancel_order"
    outcome = ReplyOutcome.objects.get(message=reply)
    assert outcome.reg_polite
    assert outcome.page_segment == "free"
    assert outcome.intent == "cancel_order"
    assert not ReplyOutcome.objects.filter(message=failed).exists()
    tagged.refresh_from_db()
    untagged.refresh_from_db()
    assert (tagged.registers, tagged.register_source) == (["colloquial", "typos"], "tags")
    assert untagged.register_source == "detector"
    assert untagged.register == "offensive"
    # Running it again changes nothing.
    before = list(ReplyOutcome.objects.values())
    call_command("monitoring_backfill", verbosity=0)
    assert list(ReplyOutcome.objects.values()) == before


def test_importing_tickets_labels_them(tmp_path):
    from finetune.services.tickets import ticket_import

    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"external_id": "a", "tags": ["B", "P"], "messages": [{"role": "customer", "body": "hi"},'
        ' {"role": "agent", "body": "Hello"}]}\n'
        '{"external_id": "b", "tags": ["vip"], "messages": [{"role": "customer", "body": "cancel order 1234"},'
        ' {"role": "agent", "body": "Done"}]}\n'
    )
    ticket_import(path=path, fmt="jsonl", source="t")
    a, b = Ticket.objects.get(external_id="a"), Ticket.objects.get(external_id="b")
    assert (a.registers, a.register_source) == (["polite"], "tags")
    assert (b.register, b.register_source) == ("keyword_only", "detector")
