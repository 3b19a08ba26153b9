"""Admin pages of model versions: the comparison, reply quality beside the active version and
retrieval (with example replies and the gate's verdict), "Promote" (gates, reason), "Roll back", "Restore"."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from finetune.forms import PromoteForm, RollbackForm
from finetune.models import ModelVersion, ModelVersionEvent
from finetune.selectors import (
    bias_report_latest,
    bias_report_table,
    model_version_active,
    model_version_comparison,
    model_version_quality,
)
from finetune.services.gates import model_version_gates_evaluate
from finetune.services.model_versions import model_version_promote, model_version_restorable, model_version_rollback
from supportbot.errors import ApplicationError

from .display import PROMOTE_PERMISSION, pretty_json


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
    list_display = (
        "label",
        "status",
        "base_model",
        "dataset_version",
        "val_loss",
        "rouge",
        "gates",
        "created_at",
        "promoted_at",
    )
    list_filter = ("status", "base_model")
    search_fields = ("number", "base_model", "notes")
    readonly_fields = [f.name for f in ModelVersion._meta.fields if f.name != "notes"] + [
        "metrics_pretty",
        "gate_results_pretty",
    ]
    exclude = ("metrics", "gate_results")
    inlines = [ModelVersionEventInline]
    change_list_template = "admin/finetune/modelversion/change_list.html"
    change_form_template = "admin/finetune/modelversion/change_form.html"
    actions = ["promote_selected", "restore_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # versions come from training runs

    def has_delete_permission(self, request: HttpRequest, obj: ModelVersion | None = None) -> bool:
        if obj is not None and obj.status == ModelVersion.Status.ACTIVE:
            return False  # customers are talking to it
        return super().has_delete_permission(request, obj)

    @admin.display(description="val loss")
    def val_loss(self, obj: ModelVersion) -> str:
        value = (obj.metrics or {}).get("eval_loss")
        return f"{value:.3f}" if isinstance(value, int | float) else "—"

    @admin.display(description="ROUGE-L (lookup)")
    def rouge(self, obj: ModelVersion) -> str:
        metrics = obj.metrics or {}
        mine, lookup = metrics.get("rouge_l"), metrics.get("rouge_l_retrieval")
        if not isinstance(mine, int | float):
            return "—"
        return f"{mine:.3f}" + (f" ({lookup:.3f})" if isinstance(lookup, int | float) else "")

    @admin.display(description="gates", boolean=True)
    def gates(self, obj: ModelVersion) -> bool | None:
        return (obj.gate_results or {}).get("passed")

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: ModelVersion) -> str:
        return pretty_json(obj.metrics)

    @admin.display(description="gate results")
    def gate_results_pretty(self, obj: ModelVersion) -> str:
        return pretty_json(obj.gate_results)

    def get_urls(self):
        view = self.admin_site.admin_view
        urls = [
            path("rollback/", view(self.rollback_view), name="finetune_modelversion_rollback"),
            path("<int:version_id>/promote/", view(self.promote_view), name="finetune_modelversion_promote"),
            path("<int:version_id>/restore/", view(self.restore_view), name="finetune_modelversion_restore"),
        ]
        return urls + super().get_urls()

    def _can_promote(self, request: HttpRequest) -> bool:
        return request.user.has_perm(PROMOTE_PERMISSION)

    def changelist_view(self, request: HttpRequest, extra_context=None):
        active = model_version_active()
        extra_context = {
            **(extra_context or {}),
            "active_version": active,
            "can_promote": self._can_promote(request),
            "rollback_url": reverse("admin:finetune_modelversion_rollback"),
        }
        return super().changelist_view(request, extra_context)

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        version = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if version is not None:
            extra.update(
                {
                    "version": version,
                    "can_promote": self._can_promote(request),
                    "promote_url": reverse("admin:finetune_modelversion_promote", args=[version.pk]),
                    "restore_url": reverse("admin:finetune_modelversion_restore", args=[version.pk]),
                    "restorable": model_version_restorable(version),
                    "comparison": model_version_comparison(version),
                    "quality": model_version_quality(version),
                    "active_version": model_version_active(),
                }
            )
            bias = bias_report_latest(version)
            if bias is not None:
                extra.update({"bias_report": bias, "bias_table": bias_report_table(bias)})
        return super().change_view(request, object_id, form_url, extra)

    def promote_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        if not self._can_promote(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=version_id)
        form = PromoteForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                model_version_promote(version=version, actor=request.user, reason=form.cleaned_data["reason"])
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Promoted {version.label}: it is active, and chat servers are reloading it.")
                return redirect("admin:finetune_modelversion_change", version.pk)
        active = model_version_active()
        # Shown as the gates stand now, against the version active now (nothing is saved by a GET).
        gates = model_version_gates_evaluate(version=version, active=active, save=False)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Promote {version.label}",
            "version": version,
            "active_version": active,
            "comparison": model_version_comparison(version, active),
            "quality": model_version_quality(version),
            "gates": gates,
            "form": form,
        }
        return TemplateResponse(request, "admin/finetune/modelversion/promote.html", context)

    def restore_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        """One click: make an earlier version active again."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self._can_promote(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=version_id)
        form = RollbackForm(request.POST)
        reason = form.cleaned_data["reason"] if form.is_valid() else ""
        try:
            model_version_rollback(actor=request.user, to_version=version, reason=reason)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Restored {version.label}: it is the active version again.")
        return redirect("admin:finetune_modelversion_change", version.pk)

    def rollback_view(self, request: HttpRequest) -> HttpResponse:
        """One click: go back to the version that was active before the current one."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self._can_promote(request):
            raise PermissionDenied
        form = RollbackForm(request.POST)
        reason = form.cleaned_data["reason"] if form.is_valid() else ""
        try:
            version = model_version_rollback(actor=request.user, reason=reason)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Rolled back: {version.label} is active again.")
        return redirect("admin:finetune_modelversion_changelist")

    @admin.action(description="Promote the selected version…", permissions=["promote"])
    def promote_selected(self, request: HttpRequest, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to promote.", messages.WARNING)
            return None
        return redirect("admin:finetune_modelversion_promote", queryset.get().pk)

    @admin.action(description="Restore the selected earlier version", permissions=["promote"])
    def restore_selected(self, request: HttpRequest, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to restore.", messages.WARNING)
            return None
        version = queryset.get()
        try:
            model_version_rollback(actor=request.user, to_version=version)
        except ApplicationError as exc:
            self.message_user(request, exc.message, messages.ERROR)
        else:
            self.message_user(request, f"Restored {version.label}: it is the active version again.", messages.SUCCESS)
        return None

    def has_promote_permission(self, request: HttpRequest) -> bool:
        return self._can_promote(request)


@admin.register(ModelVersionEvent)
class ModelVersionEventAdmin(admin.ModelAdmin):
    list_display = ("version", "action", "previous", "actor", "automatic", "gates_overridden", "created_at")
    list_filter = ("action", "automatic", "gates_overridden")
    search_fields = ("reason",)
    readonly_fields = [f.name for f in ModelVersionEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # events are written by promotion and rollback

    def has_change_permission(self, request: HttpRequest, obj: ModelVersionEvent | None = None) -> bool:
        return False
