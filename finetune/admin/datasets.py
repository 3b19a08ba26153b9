"""Admin pages of dataset versions: what each build wrote, from which tickets, by whom."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from finetune.models import DatasetVersion


@admin.register(DatasetVersion)
class DatasetVersionAdmin(admin.ModelAdmin):
    list_display = ("name", "num_train", "num_validation", "tokenizer", "short_hash", "created_by", "created_at")
    list_filter = ("created_at",)
    search_fields = ("name", "content_hash", "path")
    readonly_fields = [f.name for f in DatasetVersion._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # datasets come from build_dataset (or "build fresh" on retrain), never typed in

    @admin.display(description="content hash")
    def short_hash(self, obj: DatasetVersion) -> str:
        return obj.content_hash[:12]
