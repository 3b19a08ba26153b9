"""The rules of the agents' work: what enters a queue, who holds it, what a review is, what may train.

Queues. A bot reply enters a queue when the customer said it was not helpful, when
its confidence was low, when someone flagged it, or by random sample
(``SUPPORTBOT_REVIEW_SAMPLE_SHARE``); a conversation handed to a human enters the
handoff queue. Adding the same reply to the same queue twice is a no-op. A share of
the replies entering their first queue (``SUPPORTBOT_DOUBLE_REVIEW_SHARE``) get a
second entry that another agent must review, for the agreement figures.

Claims. ``queue_item_claim_next`` gives each agent a different entry, first in first
out (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL: concurrent callers never wait
for or get the same row). A claim lasts ``SUPPORTBOT_REVIEW_LEASE_S`` and is renewed
by activity; an expired claim is simply free again. Nobody may submit, save a draft
on, or take over an entry another agent holds.

Reviews. A submission is validated whole before anything is written (good/bad, score
1-5, known reasons, a note of at most ``NOTE_MAX_CHARS``, a correction of at most
4 KB) and saved as a new ``Review`` row: reviews are never edited, the latest counts.
It resolves the entry (and the reply's other open entries of the same slot), and puts
a correction or a reply marked good into the pending training set, superseding that
reply's earlier candidate. Only a model admin's approval lets a candidate reach a
dataset (``selectors.training_examples_approved``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from supportbot.errors import ApplicationError

from ..broadcast import AGENTS_GROUP, group_send_now, group_send_on_commit
from ..models import Conversation, Message, QueueItem, Review, TrainingCandidate
from ..monitoring.services import reply_outcome_refresh
from .selectors import (
    QueueFilters,
    display_name,
    queue_item_row,
    queue_items_filtered,
    reply_facts,
    reply_intent,
    waiting_count,
)

CORRECTION_MAX_BYTES = 4096  # "a correction over 4 KB" is refused: a support reply is far shorter
NOTE_MAX_CHARS = 2000
FLAG_NOTE_MAX_CHARS = 500


# --- broadcasts to the agents' workspace -------------------------------------------------------


def _announce(item: QueueItem, change: str) -> None:
    """Tell every open workspace about a queue entry after commit (``queue_item`` frame)."""
    row = queue_item_row(item)
    group_send_on_commit(
        AGENTS_GROUP, {"type": "agents.queue", "frame": {"type": "queue_item", "change": change, **row}}
    )


def waiting_count_announce() -> None:
    """After commit, send the number of customers waiting for a human to every workspace header."""

    def send() -> None:
        group_send_now(AGENTS_GROUP, {"type": "agents.waiting", "count": waiting_count()})

    transaction.on_commit(send)


# --- entering a queue ----------------------------------------------------------------------------


def _picked(purpose: str, key: int, share: float) -> bool:
    """A reproducible draw: the same reply is always in or out of a sample of a given share."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{purpose}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _reviewable_reply(message: Message) -> None:
    if message.role != Message.Role.BOT:
        raise ApplicationError(
            f"Message {message.pk} is a {message.get_role_display().lower()} message; only the bot's replies "
            "can be reviewed.",
            code="not_bot_reply",
        )
    if message.status != Message.Status.COMPLETE:
        raise ApplicationError(
            f"Bot reply {message.pk} is {message.get_status_display().lower()}; only finished replies can be reviewed.",
            code="not_bot_reply",
        )


def _create_item(**fields: Any) -> tuple[QueueItem, bool]:
    """Insert one entry unless its unique key exists (a no-op then, also when two callers race)."""
    lookup = {k: fields[k] for k in ("message", "source", "slot")}
    existing = QueueItem.objects.filter(**lookup).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():  # a savepoint: losing a race must not break the caller's transaction
            return QueueItem.objects.create(**fields), True
    except IntegrityError:
        return QueueItem.objects.get(**lookup), False


@transaction.atomic
def queue_item_add(*, message: Message, source: str, note: str = "", added_by=None) -> tuple[QueueItem, bool]:
    """Put a finished bot reply in the queue ``source``; returns the entry and whether it is new.

    The first time a reply enters any queue, it may also get a second entry for an
    independent review (``SUPPORTBOT_DOUBLE_REVIEW_SHARE``).
    """
    if source not in QueueItem.Source.values or source == QueueItem.Source.HANDOFF:
        raise ApplicationError(f"{source!r} is not a queue for bot replies.", code="bad_queue")
    _reviewable_reply(message)
    first_time = not QueueItem.objects.filter(message=message).exists()
    fields = {
        "kind": QueueItem.Kind.REPLY,
        "conversation_id": message.conversation_id,
        "message": message,
        "source": source,
        "note": note[:FLAG_NOTE_MAX_CHARS],
        "added_by": added_by,
        "model_version_id": message.model_version_id,
        "intent": reply_intent(message),
        "segment": message.conversation.segment,
    }
    item, created = _create_item(**fields, slot=1)
    if created:
        _announce(item, "added")
        if first_time and _picked("double", message.pk, settings.SUPPORTBOT_DOUBLE_REVIEW_SHARE):
            second, made = _create_item(**fields, slot=2)
            if made:
                _announce(second, "added")
    return item, created


def queue_items_for_finished_reply(*, message: Message) -> list[QueueItem]:
    """A reply just finished: queue it if its confidence is low, and if the random sample picks it."""
    added = []
    threshold = settings.SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD
    if message.mean_logprob is not None and message.mean_logprob < threshold:
        item, created = queue_item_add(
            message=message,
            source=QueueItem.Source.LOW_CONFIDENCE,
            note=f"Mean token log-probability {message.mean_logprob:.2f} is under {threshold}.",
        )
        if created:
            added.append(item)
    if _picked("sample", message.pk, settings.SUPPORTBOT_REVIEW_SAMPLE_SHARE):
        item, created = queue_item_add(message=message, source=QueueItem.Source.SAMPLE)
        if created:
            added.append(item)
    return added


def reply_flag(*, message_id: int, agent, note: str = "") -> tuple[QueueItem, bool]:
    """An agent flags a bot reply for review ("flagged" queue), with an optional note."""
    message = Message.objects.select_related("conversation").filter(pk=message_id).first()
    if message is None:
        raise ApplicationError(f"There is no message {message_id}.", code="not_found")
    if not isinstance(note, str) or len(note) > FLAG_NOTE_MAX_CHARS:
        raise ApplicationError(f"The flag's note must be text of at most {FLAG_NOTE_MAX_CHARS} characters.")
    return queue_item_add(message=message, source=QueueItem.Source.FLAGGED, note=note.strip(), added_by=agent)


def queue_item_add_handoff(*, conversation: Conversation, reason: str) -> tuple[QueueItem, bool]:
    """A conversation was handed to a human: one open handoff entry per conversation."""
    existing = QueueItem.objects.filter(
        conversation=conversation, kind=QueueItem.Kind.CONVERSATION, state__in=QueueItem.OPEN_STATES
    ).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            item = QueueItem.objects.create(
                kind=QueueItem.Kind.CONVERSATION,
                source=QueueItem.Source.HANDOFF,
                conversation=conversation,
                note=Conversation.HandoffReason(reason).label if reason in Conversation.HandoffReason.values else "",
                segment=conversation.segment,
            )
    except IntegrityError:
        return QueueItem.objects.get(
            conversation=conversation, kind=QueueItem.Kind.CONVERSATION, state__in=QueueItem.OPEN_STATES
        ), False
    _announce(item, "added")
    return item, True


def handoff_items_resolve(*, conversation: Conversation, agent, resolution: str) -> int:
    """Close the conversation's open handoff entry: taken over by ``agent``, or the conversation closed."""
    now = timezone.now()
    items = list(
        QueueItem.objects.select_for_update().filter(
            conversation=conversation, kind=QueueItem.Kind.CONVERSATION, state__in=QueueItem.OPEN_STATES
        )
    )
    for item in items:
        item.state = QueueItem.State.SUBMITTED if resolution == "taken_over" else QueueItem.State.DISCARDED
        item.resolution, item.resolved_at, item.resolved_by = resolution, now, agent
        item.claimed_by, item.lease_expires_at = None, None
        item.save(update_fields=["state", "resolution", "resolved_at", "resolved_by", "claimed_by", "lease_expires_at"])
        _announce(item, "resolved")
    return len(items)


def handoff_claim_check(*, conversation: Conversation, agent) -> None:
    """Refuse a takeover while another agent holds the conversation's handoff entry."""
    now = timezone.now()
    for item in QueueItem.objects.select_related("claimed_by").filter(
        conversation=conversation, kind=QueueItem.Kind.CONVERSATION, state__in=QueueItem.OPEN_STATES
    ):
        _check_claim(item, agent, now)


# --- claims --------------------------------------------------------------------------------------


def _lease() -> timedelta:
    return timedelta(seconds=settings.SUPPORTBOT_REVIEW_LEASE_S)


def _check_claim(item: QueueItem, agent, now) -> None:
    if item.claim_active(now) and item.claimed_by_id != agent.pk:
        until = timezone.localtime(item.lease_expires_at).strftime("%H:%M:%S")
        who = display_name(item.claimed_by)
        raise ApplicationError(
            f"{who} is working on this item (claimed until {until}). Take another one with Next.",
            code="claimed",
            extra={"claimed_by": who, "until": item.lease_expires_at.isoformat()},
        )


def _take(item: QueueItem, agent, now) -> None:
    """Give ``agent`` the claim on a locked ``item`` (new or renewed)."""
    if item.claimed_by_id != agent.pk or not item.claim_active(now):
        item.claimed_at = now
    item.claimed_by = agent
    item.lease_expires_at = now + _lease()


def _locked_item(item_id: int) -> QueueItem:
    item = QueueItem.objects.select_for_update(of=("self",)).select_related("claimed_by").filter(pk=item_id).first()
    if item is None:
        raise ApplicationError(f"There is no queue item {item_id}.", code="not_found")
    return item


def _open_or_refuse(item: QueueItem) -> None:
    if not item.is_open:
        raise ApplicationError(
            f"This item is already {item.get_state_display().lower()}; nothing to claim.", code="item_closed"
        )


@transaction.atomic
def queue_item_claim(*, item_id: int, agent) -> QueueItem:
    """Claim one entry for ``agent`` (or renew their claim); refused while another agent holds it."""
    now = timezone.now()
    item = _locked_item(item_id)
    _open_or_refuse(item)
    _check_claim(item, agent, now)
    _take(item, agent, now)
    item.save(update_fields=["claimed_by", "claimed_at", "lease_expires_at"])
    _announce(item, "claimed")
    return item


@transaction.atomic
def queue_item_claim_next(
    *, agent, filters: QueueFilters | None = None, skip: Collection[int] = ()
) -> QueueItem | None:
    """The oldest open entry (of ``filters``) no one else holds, claimed for ``agent``; None when none is left.

    An entry the agent already holds comes first (a reload keeps their place), unless
    it is in ``skip`` (what "next" skips past: it is released). The agent never gets a
    second-review entry of a reply they reviewed. Concurrent callers get different
    entries: rows another transaction is claiming are skipped, not waited for.
    """
    filters = filters or QueueFilters()
    now = timezone.now()
    skip = [int(pk) for pk in skip]
    if skip:
        QueueItem.objects.filter(pk__in=skip, claimed_by=agent, state__in=QueueItem.OPEN_STATES).update(
            claimed_by=None, claimed_at=None, lease_expires_at=None
        )
    candidates = queue_items_filtered(QueueFilters(**{**vars(filters), "state": "open"})).exclude(pk__in=skip)
    reviewed_by_me = Review.objects.filter(message=OuterRef("message"), reviewer=agent)
    skipped_messages = QueueItem.objects.filter(pk__in=skip, message__isnull=False).values("message")
    candidates = candidates.exclude(Exists(reviewed_by_me)).exclude(message__in=skipped_messages)
    free = Q(claimed_by__isnull=True) | Q(lease_expires_at__lte=now)
    mine = Q(claimed_by=agent, lease_expires_at__gt=now)
    for condition in (mine, free):
        query = candidates.filter(condition).order_by("created_at", "id")
        if connection.features.has_select_for_update_skip_locked:
            query = query.select_for_update(skip_locked=True, of=("self",))
        item = query.first()
        if item is not None:
            break
    else:
        return None
    _take(item, agent, now)
    item.save(update_fields=["claimed_by", "claimed_at", "lease_expires_at"])
    _announce(item, "claimed")
    return item


@transaction.atomic
def queue_item_renew(*, item_id: int, agent) -> QueueItem:
    """Extend the agent's claim (the open review page does this while the agent works)."""
    return queue_item_claim(item_id=item_id, agent=agent)


@transaction.atomic
def queue_item_release(*, item_id: int, agent) -> QueueItem:
    """Give a claimed entry back to the queue (its draft stays)."""
    item = _locked_item(item_id)
    if item.claimed_by_id == agent.pk:
        item.claimed_by, item.claimed_at, item.lease_expires_at = None, None, None
        item.save(update_fields=["claimed_by", "claimed_at", "lease_expires_at"])
        _announce(item, "released")
    return item


# --- reviews -------------------------------------------------------------------------------------


def _clean_values(
    *,
    good: Any,
    rating: Any,
    reasons: Any,
    note: Any,
    correction: Any,
    reply_body: str,
    partial: bool,
) -> dict[str, Any]:
    """Check a review's values; a draft (``partial``) may leave good and score unset."""
    if good is None and partial:
        pass
    elif not isinstance(good, bool):
        raise ApplicationError("Say whether the reply is good or bad.", code="bad_review", extra={"field": "good"})
    if rating is None and partial:
        pass
    elif isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ApplicationError(
            f"The score must be a whole number from 1 to 5, not {rating!r}.",
            code="bad_review",
            extra={"field": "score"},
        )
    if reasons is None:
        reasons = []
    if not isinstance(reasons, list | tuple) or not all(isinstance(r, str) for r in reasons):
        raise ApplicationError("Reasons must be a list of reason codes.", code="bad_review", extra={"field": "reasons"})
    unknown = [r for r in reasons if r not in Review.Reason.values]
    if unknown:
        raise ApplicationError(
            f"Unknown reason {unknown[0][:40]!r}; use {', '.join(Review.Reason.values)}.",
            code="bad_review",
            extra={"field": "reasons"},
        )
    reasons = list(dict.fromkeys(reasons))  # order kept, repeats dropped
    note = note or ""
    if not isinstance(note, str) or len(note) > NOTE_MAX_CHARS:
        raise ApplicationError(
            f"The note must be text of at most {NOTE_MAX_CHARS} characters.", code="bad_review", extra={"field": "note"}
        )
    note = note.strip()
    if Review.Reason.OTHER in reasons and not note and not partial:
        raise ApplicationError(
            "You picked 'Other': say in the note what is wrong.", code="bad_review", extra={"field": "note"}
        )
    correction = correction or ""
    if not isinstance(correction, str):
        raise ApplicationError("The correction must be text.", code="bad_review", extra={"field": "correction"})
    correction = correction.strip()
    size = len(correction.encode("utf-8"))
    if size > CORRECTION_MAX_BYTES:
        raise ApplicationError(
            f"The correction is {size:,} bytes; the limit is {CORRECTION_MAX_BYTES:,} (4 KB). Shorten it.",
            code="correction_too_long",
            extra={"field": "correction", "limit": CORRECTION_MAX_BYTES},
        )
    if correction == reply_body.strip():
        correction = ""  # unchanged text is not a correction
    return {"good": good, "rating": rating, "reasons": reasons, "note": note, "correction": correction}


def _reply_for_review(message_id: Any) -> Message:
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise ApplicationError("Name the bot reply to review by its message id.", code="not_found")
    message = (
        Message.objects.select_for_update(of=("self",))
        .select_related("conversation", "model_version")
        .filter(pk=message_id)
        .first()
    )
    if message is None:
        raise ApplicationError(f"There is no message {message_id}.", code="not_found")
    _reviewable_reply(message)
    return message


def _item_for(item_id: int | None, message: Message) -> QueueItem | None:
    if item_id is None:
        return None
    item = _locked_item(item_id)
    if item.message_id != message.pk:
        raise ApplicationError(f"Queue item {item_id} is not about message {message.pk}.", code="bad_review")
    return item


@transaction.atomic
def review_submit(
    *,
    agent,
    message_id: int,
    item_id: int | None = None,
    good: Any,
    rating: Any,
    reasons: Any = (),
    note: Any = "",
    correction: Any = "",
) -> Review:
    """Submit a review of a finished bot reply (from a queue entry, or directly); returns the new row.

    Refused, with nothing written, when: the message is not a finished bot reply;
    a value is invalid; another agent holds the entry (or, for a direct review, any
    open entry of the reply); or the agent already reviewed this reply and the entry
    is the independent second review.
    """
    now = timezone.now()
    message = _reply_for_review(message_id)
    item = _item_for(item_id, message)
    values = _clean_values(
        good=good,
        rating=rating,
        reasons=list(reasons) if isinstance(reasons, tuple) else reasons,
        note=note,
        correction=correction,
        reply_body=message.body,
        partial=False,
    )
    open_items = list(
        QueueItem.objects.select_for_update(of=("self",))
        .select_related("claimed_by")
        .filter(message=message, state__in=QueueItem.OPEN_STATES)
    )
    slot = item.slot if item is not None else 1
    for entry in [item] if item is not None else [i for i in open_items if i.slot == slot]:
        _check_claim(entry, agent, now)
    # The two reviews of a double-reviewed reply come from two people: a reviewer may
    # change their own review (same slot), not fill the other slot too.
    earlier_slots = {
        entry_slot or 1
        for entry_slot in Review.objects.filter(message=message, reviewer=agent).values_list("item__slot", flat=True)
    }
    if earlier_slots - {slot}:
        raise ApplicationError(
            "You already reviewed this reply; its second review must come from another agent.",
            code="second_reviewer",
        )
    facts = reply_facts(message)
    review = Review.objects.create(
        message=message,
        reviewer=agent,
        item=item,
        good=values["good"],
        rating=values["rating"],
        reasons=values["reasons"],
        comment=values["note"],
        corrected_body=values["correction"],
        verdict=Review.Verdict.CORRECTED
        if values["correction"]
        else (Review.Verdict.APPROVED if values["good"] else Review.Verdict.REJECTED),
        context=facts,
        model_version=message.model_version,
        segment=message.conversation.segment,
        created_at=now,
    )
    resolved = [item] if item is not None else []
    resolved += [i for i in open_items if i.slot == slot and (item is None or i.pk != item.pk)]
    for entry in resolved:
        entry.state = QueueItem.State.SUBMITTED
        entry.resolution = "reviewed" if entry is item else "reviewed_elsewhere"
        entry.resolved_at, entry.resolved_by = now, agent
        entry.claimed_by, entry.lease_expires_at = None, None
        entry.draft = {}
        entry.save(
            update_fields=[
                "state",
                "resolution",
                "resolved_at",
                "resolved_by",
                "claimed_by",
                "lease_expires_at",
                "draft",
            ]
        )
        _announce(entry, "resolved")
    _training_candidate_from(review, message, now)
    reply_outcome_refresh(message_id=message.pk)
    return review


def _training_candidate_from(review: Review, message: Message, now) -> TrainingCandidate | None:
    """The latest review decides: earlier candidates of the reply are superseded, a new one may be pending."""
    TrainingCandidate.objects.filter(
        message=message, status__in=[TrainingCandidate.Status.PENDING, TrainingCandidate.Status.APPROVED]
    ).update(
        status=TrainingCandidate.Status.SUPERSEDED, decided_at=now, decision_note=f"Review {review.pk} came later."
    )
    if review.corrected_body:
        kind, text = TrainingCandidate.Kind.CORRECTION, review.corrected_body
    elif review.good:
        kind, text = TrainingCandidate.Kind.APPROVED_REPLY, message.body
    else:
        return None
    return TrainingCandidate.objects.create(
        message=message,
        review=review,
        kind=kind,
        text=text,
        model_version=message.model_version,
        reviewer=review.reviewer,
        created_at=now,
    )


def _draft_values(values: dict[str, Any], message: Message) -> dict[str, Any]:
    return _clean_values(
        good=values.get("good"),
        rating=values.get("rating"),
        reasons=values.get("reasons") or [],
        note=values.get("note", ""),
        correction=values.get("correction", ""),
        reply_body=message.body,
        partial=True,
    )


@transaction.atomic
def review_draft_save(*, item_id: int, agent, values: dict[str, Any]) -> QueueItem:
    """Keep unsubmitted review values on the entry (state ``draft``) and renew the agent's claim."""
    now = timezone.now()
    item = _locked_item(item_id)
    if item.kind != QueueItem.Kind.REPLY:
        raise ApplicationError("A conversation waiting for a human has no review to draft.", code="bad_review")
    _open_or_refuse(item)
    _check_claim(item, agent, now)
    cleaned = _draft_values(values, item.message)
    item.draft = {**cleaned, "saved_at": now.isoformat()}
    item.draft_by = agent
    item.state = QueueItem.State.DRAFT
    _take(item, agent, now)
    item.save(update_fields=["draft", "draft_by", "state", "claimed_by", "claimed_at", "lease_expires_at"])
    _announce(item, "draft")
    return item


@transaction.atomic
def queue_item_discard(*, item_id: int, agent, note: str = "") -> QueueItem:
    """Drop an entry without a review (nothing worth reviewing, a duplicate); its draft goes too."""
    now = timezone.now()
    item = _locked_item(item_id)
    _open_or_refuse(item)
    _check_claim(item, agent, now)
    if not isinstance(note, str) or len(note) > FLAG_NOTE_MAX_CHARS:
        raise ApplicationError(f"The note must be text of at most {FLAG_NOTE_MAX_CHARS} characters.")
    item.state = QueueItem.State.DISCARDED
    item.resolution, item.resolved_at, item.resolved_by = "discarded", now, agent
    item.claimed_by, item.lease_expires_at, item.draft = None, None, {}
    if note.strip():
        item.note = note.strip()[:FLAG_NOTE_MAX_CHARS]
    item.save(
        update_fields=[
            "state",
            "resolution",
            "resolved_at",
            "resolved_by",
            "claimed_by",
            "lease_expires_at",
            "draft",
            "note",
        ]
    )
    _announce(item, "resolved")
    return item


# --- the training set ----------------------------------------------------------------------------


@transaction.atomic
def training_candidates_decide(*, ids: Iterable[int], user, approve: bool, note: str = "") -> dict[str, int]:
    """Approve (or reject) pending training candidates in bulk; only pending ones change.

    Approved candidates are in the next dataset build (``build_dataset`` / retrain);
    nothing else from the workspace is. Needs the model admins' permission.
    """
    if not user.has_perm("conversations.approve_trainingcandidate"):
        raise ApplicationError("Only model admins may approve training data.", code="forbidden")
    wanted = sorted({int(pk) for pk in ids})
    if not wanted:
        raise ApplicationError("Select at least one correction or reply.", code="empty")
    if not isinstance(note, str) or len(note) > 500:
        raise ApplicationError("The note must be text of at most 500 characters.")
    now = timezone.now()
    pending = TrainingCandidate.objects.select_for_update().filter(
        pk__in=wanted, status=TrainingCandidate.Status.PENDING
    )
    changed = pending.update(
        status=TrainingCandidate.Status.APPROVED if approve else TrainingCandidate.Status.REJECTED,
        decided_by=user,
        decided_at=now,
        decision_note=note.strip(),
    )
    return {"changed": changed, "skipped": len(wanted) - changed}
