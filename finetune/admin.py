"""Admin pages for tickets, datasets, training runs and model versions.

Training runs: a "Retrain now" button and form on the list, a run page with a live
progress bar, loss curve (server-rendered SVG, refreshed by a small static script
that polls a JSON endpoint) and a cancel button. Model versions: "Promote" (with the
metrics beside the active version's and the gate results; a failed gate needs a
reason) and "Roll back" / "Restore this version". Every action calls a service.
"""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from supportbot.errors import ApplicationError

from . import services
from .charts import loss_curve_svg
from .forms import PromoteForm, RetrainForm, RollbackForm
from .models import DatasetVersion, ModelVersion, ModelVersionEvent, Ticket, TicketMessage, TrainingRun
from .selectors import model_version_active, model_version_comparison

RETRAIN_PERMISSION = "finetune.retrain_model"
PROMOTE_PERMISSION = "finetune.promote_modelversion"


def _pretty_json(value) -> str:
    if not value:
        return "—"
    return format_html("<pre class='sb-json'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _number(value, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # datasets come from build_dataset (or "build fresh" on retrain), never typed in

    @admin.display(description="content hash")
    def short_hash(self, obj: DatasetVersion) -> str:
        return obj.content_hash[:12]


# --- training runs -----------------------------------------------------------------------------


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "status",
        "progress_percent",
        "dataset_version",
        "base_model",
        "version_link",
        "requested_by",
        "created_at",
    )
    list_filter = ("status", "base_model")
    search_fields = ("id", "base_model", "error")
    change_list_template = "admin/finetune/trainingrun/change_list.html"
    change_form_template = "admin/finetune/trainingrun/change_form.html"
    fieldsets = (
        (None, {"fields": ("status", "error", "dataset_version", "build_fresh_dataset", "base_model", "version_link")}),
        ("Progress", {"fields": ("progress_percent", "current_step", "total_steps", "current_epoch")}),
        ("Settings", {"fields": ("hyperparameters_pretty",)}),
        ("Evaluation", {"fields": ("eval_metrics_pretty",)}),
        ("Log", {"fields": ("log_tail",)}),
        (
            "Worker",
            {
                "classes": ("collapse",),
                "fields": (
                    "lane",
                    "celery_task_id",
                    "output_dir",
                    "cancel_requested",
                    "heartbeat_at",
                    "requested_by",
                    "created_at",
                    "started_at",
                    "finished_at",
                ),
            },
        ),
    )
    readonly_fields = [f.name for f in TrainingRun._meta.fields] + [
        "progress_percent",
        "version_link",
        "hyperparameters_pretty",
        "eval_metrics_pretty",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs start from "Retrain now", which checks the rules

    def has_delete_permission(self, request: HttpRequest, obj: TrainingRun | None = None) -> bool:
        if obj is not None and obj.is_live:
            return False  # cancel it first; deleting would hide a worker that is still training
        return super().has_delete_permission(request, obj)

    @admin.display(description="progress")
    def progress_percent(self, obj: TrainingRun) -> str:
        return f"{obj.progress * 100:.0f}%"

    @admin.display(description="model version")
    def version_link(self, obj: TrainingRun) -> str:
        version = ModelVersion.objects.filter(training_run=obj).first()
        if version is None:
            return "—"
        url = reverse("admin:finetune_modelversion_change", args=[version.pk])
        return format_html('<a href="{}">{}</a> ({})', url, version.label, version.get_status_display())

    @admin.display(description="settings")
    def hyperparameters_pretty(self, obj: TrainingRun) -> str:
        return _pretty_json(obj.hyperparameters)

    @admin.display(description="metrics")
    def eval_metrics_pretty(self, obj: TrainingRun) -> str:
        return _pretty_json(obj.eval_metrics)

    def get_urls(self):
        urls = [
            path("retrain/", self.admin_site.admin_view(self.retrain_view), name="finetune_trainingrun_retrain"),
            path(
                "<int:run_id>/progress/",
                self.admin_site.admin_view(self.progress_view),
                name="finetune_trainingrun_progress",
            ),
            path(
                "<int:run_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="finetune_trainingrun_cancel",
            ),
        ]
        return urls + super().get_urls()

    def changelist_view(self, request: HttpRequest, extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "can_retrain": request.user.has_perm(RETRAIN_PERMISSION),
            "retrain_url": reverse("admin:finetune_trainingrun_retrain"),
        }
        return super().changelist_view(request, extra_context)

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        run = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if run is not None:
            extra.update(
                {
                    "run": run,
                    "loss_svg": mark_safe(loss_curve_svg(run.loss_history)),  # noqa: S308 - built from numbers
                    "progress_url": reverse("admin:finetune_trainingrun_progress", args=[run.pk]),
                    "cancel_url": reverse("admin:finetune_trainingrun_cancel", args=[run.pk]),
                    "can_cancel": run.is_live and request.user.has_perm(RETRAIN_PERMISSION),
                }
            )
        return super().change_view(request, object_id, form_url, extra)

    def retrain_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm(RETRAIN_PERMISSION):
            raise PermissionDenied
        form = RetrainForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                run = services.training_run_request(actor=request.user, **form.request_arguments())
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Run #{run.pk} is queued; this page follows its progress.")
                return redirect("admin:finetune_trainingrun_change", run.pk)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Retrain the support model",
            "form": form,
            "live_run": TrainingRun.objects.filter(status__in=TrainingRun.LIVE_STATUSES).first(),
            "active_version": model_version_active(),
        }
        return TemplateResponse(request, "admin/finetune/trainingrun/retrain.html", context)

    def progress_view(self, request: HttpRequest, run_id: int) -> JsonResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(TrainingRun, pk=run_id)
        version = ModelVersion.objects.filter(training_run=run).first()
        return JsonResponse(
            {
                "id": run.pk,
                "status": run.status,
                "status_display": run.get_status_display(),
                "is_live": run.is_live,
                "progress": run.progress,
                "current_step": run.current_step,
                "total_steps": run.total_steps,
                "current_epoch": run.current_epoch,
                "last_loss": run.loss_history[-1]["loss"] if run.loss_history else None,
                "loss_points": len(run.loss_history),
                "loss_svg": loss_curve_svg(run.loss_history),
                "log_tail": run.log_tail,
                "error": run.error,
                "cancel_requested": run.cancel_requested,
                "heartbeat_at": run.heartbeat_at.isoformat() if run.heartbeat_at else None,
                "version": (
                    {
                        "label": version.label,
                        "status": version.get_status_display(),
                        "url": reverse("admin:finetune_modelversion_change", args=[version.pk]),
                    }
                    if version
                    else None
                ),
            }
        )

    def cancel_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm(RETRAIN_PERMISSION):
            raise PermissionDenied
        run = get_object_or_404(TrainingRun, pk=run_id)
        try:
            run = services.training_run_cancel(run=run, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            if run.status == TrainingRun.Status.CANCELLED:
                messages.success(request, f"Run #{run.pk} is cancelled.")
            else:
                messages.success(request, f"Run #{run.pk} stops at its next training step.")
        return redirect("admin:finetune_trainingrun_change", run.pk)


# --- model versions ----------------------------------------------------------------------------


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
        return _pretty_json(obj.metrics)

    @admin.display(description="gate results")
    def gate_results_pretty(self, obj: ModelVersion) -> str:
        return _pretty_json(obj.gate_results)

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
                    "restorable": version.status == ModelVersion.Status.RETIRED and version.promoted_at is not None,
                    "comparison": model_version_comparison(version),
                    "active_version": model_version_active(),
                }
            )
        return super().change_view(request, object_id, form_url, extra)

    def promote_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        if not self._can_promote(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=version_id)
        form = PromoteForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                services.model_version_promote(version=version, actor=request.user, reason=form.cleaned_data["reason"])
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Promoted {version.label}: it is active, and chat servers are reloading it.")
                return redirect("admin:finetune_modelversion_change", version.pk)
        active = model_version_active()
        # Shown as the gates stand now, against the version active now (nothing is saved by a GET).
        gates = services.model_version_gates_evaluate(version=version, active=active, save=False)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Promote {version.label}",
            "version": version,
            "active_version": active,
            "comparison": model_version_comparison(version, active),
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
            services.model_version_rollback(actor=request.user, to_version=version, reason=reason)
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
            version = services.model_version_rollback(actor=request.user, reason=reason)
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
            services.model_version_rollback(actor=request.user, to_version=version)
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
