"""Admin pages of imported tickets and their messages (read and searched; imports run from the command)."""

from __future__ import annotations

from django.contrib import admin

from finetune.models import Ticket, TicketMessage


class TicketMessageInline(admin.TabularInline):
    model = TicketMessage
    extra = 0
    fields = ("position", "role", "body", "sent_at")
    ordering = ("position",)


@admin.register(Ticket)
class TicketAdmin(admin.ModelAdmin):
    list_display = ("external_id", "source", "intent", "category", "customer_segment", "language", "created_at")
    list_filter = ("source", "category", "intent", "language", "customer_segment")
    search_fields = ("external_id", "subject", "intent", "messages__body")
    date_hierarchy = "created_at"
    readonly_fields = ("imported_at", "updated_at")
    inlines = [TicketMessageInline]
    list_per_page = 50
    show_full_result_count = False  # COUNT(*) over a large ticket table is slow on PostgreSQL
