"""Admin pages for tickets, datasets, training runs and model versions."""

from __future__ import annotations

from django.contrib import admin

from .models import DatasetVersion, ModelVersion, ModelVersionEvent, Ticket, TicketMessage, TrainingRun


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


@admin.register(DatasetVersion)
class DatasetVersionAdmin(admin.ModelAdmin):
    list_display = ("name", "num_train", "num_validation", "tokenizer", "short_hash", "created_by", "created_at")
    list_filter = ("created_at",)
    search_fields = ("name", "content_hash", "path")
    readonly_fields = [f.name for f in DatasetVersion._meta.fields]

    @admin.display(description="content hash")
    def short_hash(self, obj: DatasetVersion) -> str:
        return obj.content_hash[:12]


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ("id", "status", "progress_percent", "dataset_version", "base_model", "requested_by", "created_at")
    list_filter = ("status", "base_model")
    search_fields = ("id", "base_model", "error")
    readonly_fields = [f.name for f in TrainingRun._meta.fields]

    @admin.display(description="progress")
    def progress_percent(self, obj: TrainingRun) -> str:
        return f"{obj.progress * 100:.0f}%"


class ModelVersionEventInline(admin.TabularInline):
    model = ModelVersionEvent
    fk_name = "version"
    extra = 0
    can_delete = False
    readonly_fields = ("action", "previous", "actor", "automatic", "gates_overridden", "reason", "created_at")
    fields = readonly_fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("label", "status", "base_model", "dataset_version", "val_loss", "created_at", "promoted_at")
    list_filter = ("status", "base_model")
    search_fields = ("number", "base_model", "notes")
    readonly_fields = [f.name for f in ModelVersion._meta.fields if f.name != "notes"]
    inlines = [ModelVersionEventInline]

    @admin.display(description="val loss")
    def val_loss(self, obj: ModelVersion) -> str:
        value = (obj.metrics or {}).get("eval_loss")
        return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


@admin.register(ModelVersionEvent)
class ModelVersionEventAdmin(admin.ModelAdmin):
    list_display = ("version", "action", "previous", "actor", "automatic", "gates_overridden", "created_at")
    list_filter = ("action", "automatic", "gates_overridden")
    search_fields = ("reason",)
    readonly_fields = [f.name for f in ModelVersionEvent._meta.fields]
