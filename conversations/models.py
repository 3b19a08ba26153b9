"""Live conversations with customers, their messages, and the agents' work on them.

- ``Conversation`` / ``Message``: the chat itself (``services.py`` writes them).
- ``QueueItem``: one entry in an agents' work queue (a bot reply to review, or a
  conversation waiting for a human), claimed with a lease (``review/services.py``).
- ``Review``: one submitted rating of a bot reply, never edited; the latest counts.
- ``TrainingCandidate``: a correction or an approved reply waiting for a model admin's
  approval; only approved ones reach a training dataset.
- ``ReplyOutcome``: one row per finished bot reply with the segments of the customer it
  answered and everything the bias-monitoring dashboard measures about it, kept current
  when the reply, its review, the customer's answer or a handoff is written.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class BotProfile(models.Model):
    """What the bot says about itself: company name, system prompt and policy, edited in the admin.

    One row (``key='default'``); the prompt builder reads it for every reply. The company's
    facts (phone, e-mail, website, hours, returns address) fill the template slots of
    replies (``{{Customer Support Phone Number}}`` -> the phone written here); a fact left
    empty becomes neutral words ("our customer support phone line").
    """

    key = models.CharField(max_length=32, unique=True, default="default", editable=False)
    company_name = models.CharField(max_length=120, default="Acme")
    system_prompt = models.TextField(
        default=(
            "You are the customer support assistant of {company}. Answer briefly and politely. "
            "If you are not sure, offer to connect the customer with a human agent."
        ),
        help_text="Sent before every conversation. {company} is replaced by the company name.",
    )
    policy_text = models.TextField(blank=True, help_text="Policies the bot must follow (refunds, shipping…).")
    blocked_terms = models.TextField(blank=True, help_text="One term per line; masked in every bot reply.")
    support_phone = models.CharField(
        max_length=64, blank=True, help_text="Fills {{Customer Support Phone Number}} and {{PHONE}} in replies."
    )
    support_email = models.EmailField(blank=True, help_text="Fills {{Customer Support Email}} in replies.")
    website_url = models.URLField(blank=True, help_text="Fills {{Website URL}} in replies.")
    support_hours = models.CharField(
        max_length=200, blank=True, help_text='Fills {{Customer Support Hours}}, e.g. "Monday to Friday, 9:00-17:00".'
    )
    returns_address = models.TextField(blank=True, help_text="Fills {{Returns Address}} in replies.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "bot profile"

    def __str__(self) -> str:
        return f"Bot profile of {self.company_name}"


class Conversation(models.Model):
    """A chat between one customer and the bot, and possibly a human agent."""

    class Status(models.TextChoices):
        BOT = "bot", "Bot answering"
        WAITING_FOR_AGENT = "waiting_for_agent", "Waiting for an agent"
        WITH_AGENT = "with_agent", "With an agent"
        CLOSED = "closed", "Closed"

    class HandoffReason(models.TextChoices):
        NONE = "", "—"
        CUSTOMER_REQUEST = "customer_request", "Customer asked for a human"
        KEYWORD = "keyword", "Customer wrote words asking for a human"
        LOW_CONFIDENCE = "low_confidence", "Bot was not confident"
        NO_MODEL = "no_model", "No model version is active"
        AGENT_TAKEOVER = "agent_takeover", "An agent took over"
        ERROR = "error", "The bot failed to answer"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session_key = models.CharField(max_length=40, blank=True, db_index=True)
    customer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    segment = models.CharField(
        max_length=64, blank=True, db_index=True, help_text="Customer segment reported by the host page."
    )
    metadata = models.JSONField(default=dict, blank=True, help_text="Page URL, locale, user agent…")
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.BOT, db_index=True)
    handoff_reason = models.CharField(max_length=24, choices=HandoffReason.choices, blank=True, default="")
    assigned_agent = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assigned_conversations",
    )
    agent_display_name = models.CharField(
        max_length=150, blank=True, help_text="Name the customer sees for the agent who has the conversation."
    )
    started_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_message_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        permissions = [("review_conversations", "Can use the review console")]
        constraints = [
            # One open conversation per customer: two tabs opening the chat at the same
            # moment join the same conversation instead of splitting it in two.
            models.UniqueConstraint(
                fields=["session_key"],
                condition=Q(customer__isnull=True) & ~Q(session_key="") & ~Q(status="closed"),
                name="conversation_one_open_per_session",
            ),
            models.UniqueConstraint(
                fields=["customer"],
                condition=Q(customer__isnull=False) & ~Q(status="closed"),
                name="conversation_one_open_per_customer",
            ),
        ]

    def __str__(self) -> str:
        return f"Conversation {str(self.id)[:8]} ({self.get_status_display()})"

    @property
    def group_name(self) -> str:
        """Channel-layer group of every socket watching this conversation."""
        return f"conversation.{self.id}"


class Message(models.Model):
    """One message in a conversation. Saved before it is broadcast; the database is the truth."""

    class Role(models.TextChoices):
        CUSTOMER = "customer", "Customer"
        BOT = "bot", "Bot"
        AGENT = "agent", "Agent"
        SYSTEM = "system", "System"

    class Status(models.TextChoices):
        COMPLETE = "complete", "Complete"
        STREAMING = "streaming", "Streaming"
        FAILED = "failed", "Failed"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    body = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    client_id = models.CharField(
        max_length=64, blank=True, help_text="The sender's own id for the message; a resend is recognised by it."
    )
    in_reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_version = models.ForeignKey(
        "finetune.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="messages"
    )
    generation = models.JSONField(default=dict, blank=True, help_text="Generation parameters of a bot reply.")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    token_count = models.PositiveIntegerField(null=True, blank=True)
    mean_logprob = models.FloatField(null=True, blank=True, help_text="Mean token log-probability of a bot reply.")
    grounding = models.JSONField(
        default=list,
        blank=True,
        help_text="The past exchanges a bot reply was grounded on: [{origin, score, intent, question, answer}].",
    )
    helpful = models.BooleanField(null=True, blank=True, help_text="The customer's 'Was this helpful?' answer.")
    helpful_at = models.DateTimeField(null=True, blank=True)
    # Segment labels of a customer message, computed when it is saved
    # (``monitoring.services.message_segments_label``; finetune.ml.segments), so the
    # monitoring dashboard never re-scans text. ``segmenter_version`` null: not labelled.
    register = models.CharField(max_length=16, blank=True, help_text="Primary language register (customer messages).")
    registers = models.JSONField(default=list, blank=True, help_text="Every register that applies, or ['plain'].")
    language = models.CharField(max_length=8, blank=True, help_text="ISO 639-1 code, 'und' when too short to tell.")
    segmenter_version = models.PositiveSmallIntegerField(null=True, blank=True)
    intent = models.CharField(
        max_length=64, blank=True, help_text="Intent when known: a bot reply's, and the message it answered."
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "client_id"],
                condition=~Q(client_id=""),
                name="message_unique_client_id_per_conversation",
            ),
        ]
        indexes = [models.Index(fields=["conversation", "id"], name="message_conversation_id_idx")]

    def __str__(self) -> str:
        preview = self.body[:40] + ("…" if len(self.body) > 40 else "")
        return f"{self.get_role_display()}: {preview}"


class QueueItem(models.Model):
    """One entry of an agents' work queue: a bot reply to review, or a conversation waiting for a human.

    Entries come from a ``source`` (why it is there); each queue is first in, first
    out. Adding the same reply to the same queue again is a no-op (a unique
    constraint). A reply picked for double review gets a second entry (``slot`` 2)
    that only another reviewer may take. An agent claims an entry for a lease; an
    entry whose lease ran out is free again. ``state`` is the review's progress:
    pending, draft (values saved, not submitted), submitted, discarded.
    ``model_version``, ``intent`` and ``segment`` are copied from the reply so that
    the queue filters need no joins.
    """

    class Kind(models.TextChoices):
        REPLY = "reply", "Bot reply"
        CONVERSATION = "conversation", "Conversation"

    class Source(models.TextChoices):
        HANDOFF = "handoff", "Waiting for a human"
        NOT_HELPFUL = "not_helpful", "Customer said not helpful"
        LOW_CONFIDENCE = "low_confidence", "Low confidence"
        FLAGGED = "flagged", "Flagged"
        SAMPLE = "sample", "Random sample"

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Submitted"
        DISCARDED = "discarded", "Discarded"

    OPEN_STATES = (State.PENDING, State.DRAFT)

    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.REPLY)
    source = models.CharField(max_length=24, choices=Source.choices)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="queue_items")
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.CASCADE, related_name="queue_items", help_text="The bot reply."
    )
    slot = models.PositiveSmallIntegerField(default=1, help_text="2: the second, independent review of a reply.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    draft = models.JSONField(default=dict, blank=True, help_text="Review values saved but not submitted.")
    draft_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.CharField(max_length=500, blank=True, help_text="Why it was queued (the flag's note, the handoff).")
    added_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_version = models.ForeignKey(
        "finetune.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    intent = models.CharField(max_length=64, blank=True)
    segment = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolution = models.CharField(
        max_length=32, blank=True, help_text="reviewed, reviewed_elsewhere, taken_over, closed, discarded…"
    )

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["message", "source", "slot"],
                condition=Q(message__isnull=False),
                name="queueitem_once_per_reply_source_slot",
            ),
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(kind="conversation") & Q(state__in=["pending", "draft"]),
                name="queueitem_one_open_handoff_per_conversation",
            ),
            models.CheckConstraint(
                condition=(Q(kind="reply") & Q(message__isnull=False))
                | (Q(kind="conversation") & Q(message__isnull=True)),
                name="queueitem_reply_has_message",
            ),
            models.CheckConstraint(condition=Q(slot__in=[1, 2]), name="queueitem_slot_1_or_2"),
        ]
        indexes = [
            # The queue pages and "next": open entries of one source, oldest first.
            models.Index(fields=["state", "source", "created_at", "id"], name="queueitem_fifo_idx"),
            models.Index(fields=["state", "created_at", "id"], name="queueitem_open_idx"),
        ]

    def __str__(self) -> str:
        what = f"reply {self.message_id}" if self.message_id else f"conversation {str(self.conversation_id)[:8]}"
        slot = " (second review)" if self.slot == 2 else ""
        return f"{self.get_source_display()}: {what}{slot} [{self.get_state_display()}]"

    @property
    def is_open(self) -> bool:
        return self.state in self.OPEN_STATES

    def claim_active(self, now) -> bool:
        """Whether someone holds this entry right now (a claim whose lease has not run out)."""
        return self.claimed_by_id is not None and self.lease_expires_at is not None and self.lease_expires_at > now


class Review(models.Model):
    """One submitted review of one bot reply. Never edited: a new submission is a new row; the latest counts.

    ``good``, ``rating`` (1-5), ``reasons``, ``comment`` (the note) and
    ``corrected_body`` are what the reviewer gave; ``verdict`` follows from them
    (corrected when there is a correction, else approved when good, else rejected).
    ``context`` is what the reviewer saw of the reply (confidence, latency, the
    exchanges it was grounded on), kept as it was.
    """

    class Verdict(models.TextChoices):
        APPROVED = "approved", "Approved"
        CORRECTED = "corrected", "Corrected"
        REJECTED = "rejected", "Rejected"

    class Reason(models.TextChoices):
        INCORRECT = "incorrect", "Incorrect information"
        INAPPROPRIATE = "inappropriate", "Inappropriate"
        INCOMPLETE = "incomplete", "Incomplete"
        OUTDATED = "outdated", "Outdated"
        PERSONAL_DATA = "personal_data", "Leaked personal data"
        BIASED = "biased", "Biased or unfair"
        OTHER = "other", "Other"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews")
    item = models.ForeignKey(
        QueueItem, null=True, blank=True, on_delete=models.SET_NULL, related_name="reviews", help_text="Queue entry."
    )
    good = models.BooleanField(default=True, help_text="The reviewer's good/bad call.")
    rating = models.PositiveSmallIntegerField(help_text="1 (harmful or wrong) to 5 (perfect).")
    reasons = models.JSONField(default=list, blank=True, help_text="Reported reasons (Review.Reason values).")
    verdict = models.CharField(max_length=16, choices=Verdict.choices)
    corrected_body = models.TextField(blank=True, help_text="What the bot should have said.")
    comment = models.TextField(blank=True, help_text="The reviewer's note.")
    context = models.JSONField(default=dict, blank=True, help_text="What the reviewer saw of the reply.")
    # Copied from the message and conversation when the review is written, so bias
    # reports group by what was true at the time.
    model_version = models.ForeignKey(
        "finetune.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="reviews"
    )
    segment = models.CharField(max_length=64, blank=True, db_index=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(rating__gte=1) & Q(rating__lte=5), name="review_rating_1_to_5"),
            models.CheckConstraint(
                condition=~Q(verdict="corrected") | ~Q(corrected_body=""), name="review_correction_has_text"
            ),
        ]
        indexes = [
            models.Index(fields=["message", "-created_at", "-id"], name="review_latest_idx"),
            models.Index(fields=["reviewer", "created_at"], name="review_reviewer_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.get_verdict_display()} {self.rating}/5 by {self.reviewer} on message {self.message_id}"


class TrainingCandidate(models.Model):
    """A correction or an approved bot reply, waiting for a model admin before it may train a model.

    Created when a review is submitted (a correction, or a reply marked good);
    a later review of the same reply supersedes it (the latest review counts).
    Only ``approved`` candidates reach a dataset build, with their provenance: the
    reply (message), the model version that wrote it, the reviewer and the approver.
    """

    class Kind(models.TextChoices):
        APPROVED_REPLY = "approved_reply", "Approved reply"
        CORRECTION = "correction", "Correction"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending approval"
        APPROVED = "approved", "Approved for training"
        REJECTED = "rejected", "Rejected"
        SUPERSEDED = "superseded", "Superseded by a later review"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="training_candidates")
    review = models.OneToOneField(Review, on_delete=models.PROTECT, related_name="training_candidate")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    text = models.TextField(help_text="The reply to learn: the correction, or the bot's reply as written.")
    model_version = models.ForeignKey(
        "finetune.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        permissions = [("approve_trainingcandidate", "Can approve corrections and replies for training")]
        constraints = [
            models.UniqueConstraint(
                fields=["message"],
                condition=Q(status__in=["pending", "approved"]),
                name="trainingcandidate_one_live_per_reply",
            ),
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="trainingcandidate_status_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} of message {self.message_id} ({self.get_status_display()})"


class ReplyOutcome(models.Model):
    """One finished bot reply as the monitoring dashboard sees it: who it answered, and how it went.

    Written at write time by ``monitoring.services.reply_outcome_refresh`` (when the
    reply finishes, is reviewed, gets the customer's "Was this helpful?" answer, or is
    followed by a handoff), always derived again from the rows that hold the truth,
    so a refresh is idempotent and ``manage.py monitoring_backfill`` rebuilds any row.
    The dashboard aggregates this table in the database; it never reads message text.

    Segments: the answered customer message's registers (one boolean per register, as a
    message may carry several; ``register`` is the primary one), its language, the
    page's ``segment`` parameter, the intent and the model version. Outcomes: the
    latest review (``reviewed``; bad, score, correction, one boolean per report reason;
    null when not reviewed), the customer's helpful answer, whether a handoff followed
    before the bot's next reply, reply length in words and latency.
    """

    message = models.OneToOneField(Message, primary_key=True, on_delete=models.CASCADE, related_name="outcome")
    model_version = models.ForeignKey(
        "finetune.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(help_text="When the reply was written.")
    register = models.CharField(max_length=16, blank=True)
    reg_plain = models.BooleanField(default=False)
    reg_polite = models.BooleanField(default=False)
    reg_colloquial = models.BooleanField(default=False)
    reg_typos = models.BooleanField(default=False)
    reg_offensive = models.BooleanField(default=False)
    reg_keyword_only = models.BooleanField(default=False)
    language = models.CharField(max_length=8, blank=True)
    page_segment = models.CharField(max_length=64, blank=True)
    intent = models.CharField(max_length=64, blank=True)
    reply_words = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    helpful = models.BooleanField(null=True, blank=True)
    handoff = models.BooleanField(default=False, help_text="The conversation went to a human before the next reply.")
    reviewed = models.BooleanField(default=False)
    bad = models.BooleanField(null=True, blank=True, help_text="The latest review called it bad.")
    rating = models.PositiveSmallIntegerField(null=True, blank=True)
    corrected = models.BooleanField(null=True, blank=True)
    reason_incorrect = models.BooleanField(null=True, blank=True)
    reason_inappropriate = models.BooleanField(null=True, blank=True)
    reason_incomplete = models.BooleanField(null=True, blank=True)
    reason_outdated = models.BooleanField(null=True, blank=True)
    reason_personal_data = models.BooleanField(null=True, blank=True)
    reason_biased = models.BooleanField(null=True, blank=True)
    reason_other = models.BooleanField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["model_version", "created_at"], name="replyoutcome_version_time_idx")]

    def __str__(self) -> str:
        return f"Outcome of reply {self.message_id} ({self.register or 'unlabelled'})"
