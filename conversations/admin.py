"""Admin pages for conversations, messages, reviews and the bot profile."""

from __future__ import annotations

from django.contrib import admin

from .models import BotProfile, Conversation, Message, Review
from .selectors import PREVIEW_CHARS, conversations_with_preview


@admin.register(BotProfile)
class BotProfileAdmin(admin.ModelAdmin):
    list_display = ("company_name", "updated_at")

    def has_add_permission(self, request) -> bool:
        return not BotProfile.objects.exists()


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    fields = ("created_at", "role", "body", "status", "model_version", "helpful")
    readonly_fields = fields
    can_delete = False
    ordering = ("created_at", "id")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = (
        "short_id",
        "preview",
        "status",
        "segment",
        "assigned_agent",
        "handoff_reason",
        "started_at",
        "last_message_at",
    )
    list_filter = ("status", "handoff_reason", "segment")
    search_fields = ("id", "session_key", "messages__body")
    date_hierarchy = "started_at"
    readonly_fields = ("id", "session_key", "customer", "started_at", "last_message_at", "ended_at", "metadata")
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


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "conversation", "role", "short_body", "status", "model_version", "helpful", "created_at")
    list_filter = ("role", "status", "helpful", "model_version")
    search_fields = ("body", "client_id", "conversation__id")
    readonly_fields = [f.name for f in Message._meta.fields]

    @admin.display(description="body")
    def short_body(self, obj: Message) -> str:
        return obj.body[:80]


@admin.register(Review)
class ReviewAdmin(admin.ModelAdmin):
    list_display = ("id", "message", "verdict", "rating", "reviewer", "model_version", "segment", "created_at")
    list_filter = ("verdict", "rating", "model_version", "segment")
    search_fields = ("comment", "corrected_body", "message__body")
    readonly_fields = [f.name for f in Review._meta.fields]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # reviews are a log; a new rating is a new row
