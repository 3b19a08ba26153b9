"""Segment labels at write time, and each bot reply's ``ReplyOutcome`` row.

A customer message is labelled as it is saved (``message_segments_label``: registers,
language; ``finetune.ml.segments``). The bot reply that answers it gets its intent when
it finishes, which is also copied onto the customer message. ``reply_outcome_refresh``
derives a reply's ``ReplyOutcome`` row again from the rows that hold the truth (the
reply, the message it answered, its conversation, its latest review, the handoff
notices after it), so every write path calls the same function and a repeated call
changes nothing. ``monitoring_backfill`` labels and derives what was written before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from finetune.ml import segments

from ..models import Conversation, Message, ReplyOutcome, Review
from ..review.selectors import reply_intent

log = logging.getLogger(__name__)

BACKFILL_BATCH = 500
HANDOFF_NOTICE = "handoff"  # Message.generation["notice"] of the system message a handoff writes
REGISTER_FIELDS = {name: f"reg_{name}" for name in segments.REGISTER_LABELS}
REASON_FIELDS = {reason: f"reason_{reason}" for reason in Review.Reason.values}


def message_segments_label(text: str) -> dict[str, Any]:
    """The segment fields to save with a customer message; empty (unlabelled) when the detector fails.

    A detector error must never cost the customer their message: it is logged, the
    message is saved unlabelled, and ``manage.py monitoring_backfill`` labels it later.
    """
    try:
        labels = segments.message_segments(text)
    except Exception:  # the message matters more than its label
        log.exception("Segment labelling failed; the message is saved unlabelled")
        return {}
    return {
        "register": labels["register"],
        "registers": labels["registers"],
        "language": labels["language"],
        "segmenter_version": labels["segmenter_version"],
    }


def _handoff_after(message: Message) -> bool:
    """Whether a handoff notice follows the reply before the bot's next reply in its conversation."""
    later = Message.objects.filter(conversation_id=message.conversation_id, pk__gt=message.pk)
    next_reply = later.filter(role=Message.Role.BOT).order_by("pk").values_list("pk", flat=True).first()
    notices = later.filter(role=Message.Role.SYSTEM, generation__notice=HANDOFF_NOTICE)
    if next_reply is not None:
        notices = notices.filter(pk__lt=next_reply)
    return notices.exists()


def _outcome_fields(message: Message, asked: Message | None, latest: Review | None, handoff: bool) -> dict[str, Any]:
    registers = set(asked.registers or []) if asked is not None and asked.segmenter_version is not None else set()
    fields: dict[str, Any] = {
        "model_version_id": message.model_version_id,
        "created_at": message.created_at,
        "register": asked.register if asked is not None else "",
        **{field: name in registers for name, field in REGISTER_FIELDS.items()},
        "language": asked.language if asked is not None else "",
        "page_segment": message.conversation.segment,
        "intent": message.intent or (asked.intent if asked is not None else ""),
        "reply_words": len(message.body.split()),
        "latency_ms": message.latency_ms,
        "helpful": message.helpful,
        "handoff": handoff,
        "reviewed": latest is not None,
    }
    if latest is None:
        fields.update({"bad": None, "rating": None, "corrected": None, **dict.fromkeys(REASON_FIELDS.values())})
    else:
        reasons = set(latest.reasons or [])
        fields.update(
            {
                "bad": not latest.good,
                "rating": latest.rating,
                "corrected": latest.verdict == Review.Verdict.CORRECTED,
                **{field: reason in reasons for reason, field in REASON_FIELDS.items()},
            }
        )
    return fields


def reply_outcome_refresh(*, message_id: int) -> ReplyOutcome | None:
    """Write the ``ReplyOutcome`` of one bot reply from the stored rows; None (and no row) unless it finished."""
    message = (
        Message.objects.select_related("conversation", "in_reply_to")
        .filter(pk=message_id, role=Message.Role.BOT)
        .first()
    )
    if message is None or message.status != Message.Status.COMPLETE:
        ReplyOutcome.objects.filter(message_id=message_id).delete()
        return None
    latest = message.reviews.order_by("-created_at", "-id").first()
    fields = _outcome_fields(message, message.in_reply_to, latest, _handoff_after(message))
    row = ReplyOutcome.objects.filter(message_id=message.pk)
    current = row.values(*fields).first()
    if current is None:
        try:
            with transaction.atomic():  # a savepoint: a concurrent refresh may insert first
                return ReplyOutcome.objects.create(message_id=message.pk, **fields)
        except IntegrityError:
            current = {}
    if current != fields:
        # update() skips auto_now, and the dashboard's cache fingerprint is the latest
        # updated_at: a review of a reply already counted must make the kept figures stale.
        # Unchanged rows keep theirs, so a repeated refresh (the backfill) changes nothing.
        row.update(**fields, updated_at=timezone.now())
    return ReplyOutcome.objects.get(message_id=message.pk)


def reply_intent_record(*, message: Message, intent: str) -> None:
    """A finished reply's intent, on the reply and (when it has none yet) on the message it answered."""
    intent = (intent or "")[:64]
    if not intent:
        return
    Message.objects.filter(pk=message.pk).update(intent=intent)
    message.intent = intent
    if message.in_reply_to_id is not None:
        Message.objects.filter(pk=message.in_reply_to_id, intent="").update(intent=intent)


def reply_outcome_after_handoff(*, conversation: Conversation) -> None:
    """A handoff was written: it counts against the conversation's latest finished bot reply."""
    latest = (
        Message.objects.filter(conversation=conversation, role=Message.Role.BOT, status=Message.Status.COMPLETE)
        .order_by("-pk")
        .values_list("pk", flat=True)
        .first()
    )
    if latest is not None:
        reply_outcome_refresh(message_id=latest)


def monitoring_backfill(
    *, relabel: bool = False, batch_size: int = BACKFILL_BATCH, progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Label customer messages saved unlabelled (or, with ``relabel``, by an older segmenter), record the
    intent of finished replies that have none, and derive every finished reply's ``ReplyOutcome``.

    Safe to run again and while the chat is live: each step reads and writes in batches.
    """
    note = progress or (lambda line: None)
    customers = Message.objects.filter(role=Message.Role.CUSTOMER)
    pending = (
        customers.exclude(segmenter_version=segments.SEGMENTER_VERSION)
        if relabel
        else customers.filter(segmenter_version__isnull=True)
    )
    labelled = 0
    last_id = 0
    while True:
        batch = list(pending.filter(pk__gt=last_id).order_by("pk").only("id", "body")[:batch_size])
        if not batch:
            break
        for message in batch:
            for name, value in message_segments_label(message.body).items():
                setattr(message, name, value)
        Message.objects.bulk_update(batch, ["register", "registers", "language", "segmenter_version"])
        labelled += len(batch)
        last_id = batch[-1].pk
        note(f"labelled {labelled} customer messages")
    replies = Message.objects.filter(role=Message.Role.BOT, status=Message.Status.COMPLETE)
    intents = 0
    for message in replies.filter(intent="").only("id", "generation", "in_reply_to_id").iterator(chunk_size=batch_size):
        intent = reply_intent(message)
        if intent:
            reply_intent_record(message=message, intent=intent)
            intents += 1
    derived = 0
    for message_id in replies.order_by("pk").values_list("pk", flat=True).iterator(chunk_size=batch_size):
        reply_outcome_refresh(message_id=message_id)
        derived += 1
        if derived % batch_size == 0:
            note(f"derived {derived} reply outcomes")
    # Outcomes of replies that are no longer finished (a recovered reply marked failed).
    removed, _ = ReplyOutcome.objects.exclude(message__status=Message.Status.COMPLETE).delete()
    return {"labelled": labelled, "intents": intents, "outcomes": derived, "removed": removed}
