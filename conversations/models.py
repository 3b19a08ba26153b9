"""Live conversations with customers, their messages, and agents' reviews of bot replies."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class BotProfile(models.Model):
    """What the bot says about itself: company name, system prompt and policy, edited in the admin.

    One row (``key='default'``); the prompt builder reads it for every reply.
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
    helpful = models.BooleanField(null=True, blank=True, help_text="The customer's 'Was this helpful?' answer.")
    helpful_at = models.DateTimeField(null=True, blank=True)
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


class Review(models.Model):
    """An agent's rating of one bot reply. Never edited: a new rating is a new row."""

    class Verdict(models.TextChoices):
        APPROVED = "approved", "Approved"
        CORRECTED = "corrected", "Corrected"
        REJECTED = "rejected", "Rejected"

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews")
    rating = models.PositiveSmallIntegerField(help_text="1 (harmful or wrong) to 5 (perfect).")
    verdict = models.CharField(max_length=16, choices=Verdict.choices)
    corrected_body = models.TextField(blank=True, help_text="What the bot should have said.")
    comment = models.TextField(blank=True)
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

    def __str__(self) -> str:
        return f"{self.get_verdict_display()} {self.rating}/5 by {self.reviewer} on message {self.message_id}"
