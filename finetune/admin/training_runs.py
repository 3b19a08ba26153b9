"""Admin pages of training runs: "Retrain now", the live run page, its progress endpoint, cancel."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from finetune import selectors
from finetune.forms import RetrainForm
from finetune.models import TrainingRun
from finetune.services.training_runs import training_run_cancel, training_run_request
from supportbot.errors import ApplicationError

from .charts import loss_curve_svg
from .display import RETRAIN_PERMISSION, pretty_json


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
        version = selectors.model_version_of_run(obj)
        if version is None:
            return "—"
        url = reverse("admin:finetune_modelversion_change", args=[version.pk])
        return format_html('<a href="{}">{}</a> ({})', url, version.label, version.get_status_display())

    @admin.display(description="settings")
    def hyperparameters_pretty(self, obj: TrainingRun) -> str:
        return pretty_json(obj.hyperparameters)

    @admin.display(description="metrics")
    def eval_metrics_pretty(self, obj: TrainingRun) -> str:
        return pretty_json(obj.eval_metrics)

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
                    "phase": selectors.training_run_progress(run, version_url=str)["phase"],
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
                run = training_run_request(actor=request.user, **form.request_arguments())
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
            "live_run": selectors.training_run_live(lane=None),
            "active_version": selectors.model_version_active(),
        }
        return TemplateResponse(request, "admin/finetune/trainingrun/retrain.html", context)

    def progress_view(self, request: HttpRequest, run_id: int) -> JsonResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(TrainingRun, pk=run_id)
        data = selectors.training_run_progress(
            run, version_url=lambda version: reverse("admin:finetune_modelversion_change", args=[version.pk])
        )
        return JsonResponse({**data, "loss_svg": loss_curve_svg(run.loss_history)})

    def cancel_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm(RETRAIN_PERMISSION):
            raise PermissionDenied
        run = get_object_or_404(TrainingRun, pk=run_id)
        try:
            run = training_run_cancel(run=run, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            if run.status == TrainingRun.Status.CANCELLED:
                messages.success(request, f"Run #{run.pk} is cancelled.")
            else:
                messages.success(request, f"Run #{run.pk} stops at its next training step.")
        return redirect("admin:finetune_trainingrun_change", run.pk)
