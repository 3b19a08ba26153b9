"""Admin pages for conversations, messages, reviews, queue entries, training candidates and the bot profile.

The admin is for looking things up. The chat's rows change only through the
services: conversations, messages, reviews and queue entries are read-only here (no
add forms: a message or a review made here would skip every rule), and agents do
their work in the workspace (``/agent/``). Each role sees what README's roles table
says: agents read conversations, messages and reviews; model admins also edit the bot
profile and approve training candidates.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.utils.html import format_html

from supportbot.errors import ApplicationError

from .models import BotProfile, Conversation, Message, QueueItem, Review, TrainingCandidate
from .review.services import training_candidates_decide
from .selectors import PREVIEW_CHARS, conversations_with_preview


class ReadOnlyAdmin(admin.ModelAdmin):
    """A log kept by the services: viewable by whoever may view it, never added or edited here."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BotProfile)
class BotProfileAdmin(admin.ModelAdmin):
    list_display = ("company_name", "updated_at")
    fieldsets = (
        (None, {"fields": ("company_name", "system_prompt", "policy_text", "blocked_terms")}),
        (
            "Company facts",
            {
                "fields": ("support_phone", "support_email", "website_url", "support_hours", "returns_address"),
                "description": "Put into replies where the model writes a template slot such as "
                "{{Customer Support Phone Number}}; an empty fact becomes neutral words.",
            },
        ),
    )

    def has_add_permission(self, request) -> bool:
        # One profile: "add" only while none exists, and only for those allowed to add one.
        return super().has_add_permission(request) and not BotProfile.objects.exists()


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("created_at", "role", "body", "status", "model_version", "helpful")
    readonly_fields = fields
    can_delete = False
    ordering = ("created_at", "id")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = (
        "short_id",
        "preview",
        "status",
        "segment",
        "assigned_agent",
        "handoff_reason",
        "started_at",
        "last_message_at",
        "workspace_link",
    )
    list_filter = ("status", "handoff_reason", "segment")
    search_fields = ("id", "session_key", "messages__body")
    date_hierarchy = "started_at"
    inlines = [MessageInline]

    def get_queryset(self, request):
        return conversations_with_preview(super().get_queryset(request))

    @admin.display(description="conversation")
    def short_id(self, obj: Conversation) -> str:
        return str(obj.id)[:8]

    @admin.display(description="first message")
    def preview(self, obj: Conversation) -> str:
        text = getattr(obj, "preview", None)
        if not text:
            return "—"  # no customer message (a customer who only asked for a human)
        return text + ("…" if len(text) >= PREVIEW_CHARS else "")

    @admin.display(description="workspace")
    def workspace_link(self, obj: Conversation) -> str:
        return format_html('<a href="/agent/conversations/{}/">Open in the workspace</a>', obj.pk)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation", "role", "short_body", "status", "model_version", "helpful", "created_at")
    list_filter = ("role", "status", "helpful", "model_version")
    search_fields = ("body", "client_id", "conversation__id")

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return obj.body[:80]


@admin.register(Review)
class ReviewAdmin(ReadOnlyAdmin):
    list_display = ("id", "message", "good", "rating", "verdict", "reviewer", "model_version", "segment", "created_at")
    list_filter = ("verdict", "good", "rating", "model_version", "segment")
    search_fields = ("comment", "corrected_body", "message__body")

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # reviews are a log; a new rating is a new row


@admin.register(QueueItem)
class QueueItemAdmin(ReadOnlyAdmin):
    list_display = ("id", "source", "kind", "slot", "state", "claimed_by", "lease_expires_at", "created_at")
    list_filter = ("source", "state", "kind", "slot")
    search_fields = ("message__body", "conversation__id", "note")

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(TrainingCandidate)
class TrainingCandidateAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "status", "message", "model_version", "reviewer", "decided_by", "created_at")
    list_filter = ("status", "kind", "model_version")
    search_fields = ("text", "message__body")
    actions = ["approve", "reject"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_approve_permission(self, request) -> bool:
        return request.user.has_perm("conversations.approve_trainingcandidate")

    def _decide(self, request, queryset, *, approve: bool) -> None:
        try:
            result = training_candidates_decide(
                ids=list(queryset.values_list("pk", flat=True)), user=request.user, approve=approve
            )
        except ApplicationError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        verb = "approved for training" if approve else "rejected"
        note = f"; {result['skipped']} were not pending and stayed as they were" if result["skipped"] else ""
        self.message_user(request, f"{result['changed']} {verb}{note}.", messages.SUCCESS)

    @admin.action(description="Approve the selected for training", permissions=["approve"])
    def approve(self, request, queryset) -> None:
        self._decide(request, queryset, approve=True)

    @admin.action(description="Reject the selected", permissions=["approve"])
    def reject(self, request, queryset) -> None:
        self._decide(request, queryset, approve=False)
