"""Pages of the agents' workspace: queues, the review page, live conversations, progress, the training set.

Thin: each view parses the request, calls one service or selector of
``conversations`` and renders the answer. Pages need the ``review_conversations``
permission (support agents, model admins, superusers); a visitor who is not signed
in is sent to the login page, a signed-in customer gets 403. Every change is a POST
with Django's CSRF check. A refused change (``ApplicationError``) re-renders the page
with the message and what the agent typed (HTML), or answers
``{"error", "message", "field"}`` with 400/403/404/409 (``Accept: application/json``,
the pages' JavaScript).
"""

from __future__ import annotations

import functools
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from conversations import services as chat_services
from conversations.models import Conversation, QueueItem, Review, TrainingCandidate
from conversations.monitoring import selectors as monitoring
from conversations.review import selectors
from conversations.review import services as review_services
from conversations.review.export import FORMATS, csv_chunks, jsonl_chunks, write_hf
from conversations.review.services import CORRECTION_MAX_BYTES, NOTE_MAX_CHARS
from conversations.review.textdiff import word_diff
from supportbot.errors import ApplicationError

AGENT_PERMISSION = "conversations.review_conversations"
APPROVE_PERMISSION = "conversations.approve_trainingcandidate"
SKIPPED_SESSION_KEY = "workspace_skipped"  # entries "next" skipped past in this session
SKIPPED_KEEP = 50
STATUS_BY_CODE = {"forbidden": 403, "not_found": 404, "claimed": 409, "conversation_closed": 409, "item_closed": 409}


def agent_required(view=None, *, permission: str = AGENT_PERMISSION):
    """Signed-in staff with ``permission`` only: others are sent to log in (anonymous) or refused (403)."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(request: HttpRequest, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not request.user.has_perm(AGENT_PERMISSION):
                raise PermissionDenied("The agent workspace is for support agents and admins.")
            if not request.user.has_perm(permission):
                raise PermissionDenied("This page is for model admins.")
            return func(request, *args, **kwargs)

        return wrapper

    return decorate(view) if view is not None else decorate


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _error_json(exc: ApplicationError) -> JsonResponse:
    return JsonResponse(
        {"error": exc.code, "message": exc.message, **exc.extra}, status=STATUS_BY_CODE.get(exc.code, 400)
    )


def _header(request: HttpRequest) -> dict[str, Any]:
    """What every workspace page shows in its header."""
    return {
        "waiting": selectors.waiting_count(),
        "can_approve": request.user.has_perm(APPROVE_PERMISSION),
        "agent_name": selectors.display_name(request.user),
    }


# --- queues ---------------------------------------------------------------------------------


@require_GET
@agent_required
def queue_page(request: HttpRequest) -> HttpResponse:
    error = ""
    try:
        filters = selectors.queue_filters_parse(request.GET)
    except ApplicationError as exc:
        filters, error = selectors.QueueFilters(), exc.message
    page = max(1, int(request.GET["page"])) if request.GET.get("page", "").isdigit() else 1
    items, has_next = selectors.queue_page(filters, page=page)
    now = timezone.now()
    counts = selectors.queue_counts()
    context = {
        **_header(request),
        "filters": filters,
        "filter_query": urlencode(filters.as_query()),
        "rows": [selectors.queue_item_row(item, now=now) for item in items],
        "page": page,
        "has_next": has_next,
        "tabs": [("", "All queues", counts["all"])]
        + [(value, label, counts[value]) for value, label in QueueItem.Source.choices],
        "choices": selectors.queue_filter_choices(filters),
        "states": selectors.STATE_FILTERS,
        "lease_minutes": max(1, settings.SUPPORTBOT_REVIEW_LEASE_S // 60),
        "error": error,
        "page_config": {"page": "queue", "filters": filters.as_query(), "narrowed": filters.narrowed},
    }
    return render(request, "workspace/queue.html", context, status=400 if error else 200)


def _skipped(request: HttpRequest) -> list[int]:
    return [int(pk) for pk in request.session.get(SKIPPED_SESSION_KEY, []) if str(pk).isdigit()]


@require_POST
@agent_required
def queue_next(request: HttpRequest) -> HttpResponse:
    """Claim the oldest free entry of the chosen queue and filters; "skip" the current one if given."""
    try:
        filters = selectors.queue_filters_parse(request.POST)
    except ApplicationError as exc:
        messages.error(request, exc.message)
        return redirect("workspace:queue")
    skip = _skipped(request)
    current = request.POST.get("skip", "")
    if current.isdigit():
        skip = [int(current), *[pk for pk in skip if pk != int(current)]][:SKIPPED_KEEP]
        request.session[SKIPPED_SESSION_KEY] = skip
    item = review_services.queue_item_claim_next(agent=request.user, filters=filters, skip=skip)
    if item is None and skip:
        # Everything left was skipped before: start over with those.
        request.session[SKIPPED_SESSION_KEY] = []
        item = review_services.queue_item_claim_next(
            agent=request.user, filters=filters, skip=[int(current)] if current.isdigit() else []
        )
    query = urlencode(filters.as_query())
    if item is None:
        messages.info(request, "Nothing left to review in this queue. New items appear here as they arrive.")
        return redirect(f"/agent/?{query}" if query else "/agent/")
    return redirect(f"/agent/items/{item.pk}/" + (f"?{query}" if query else ""))


# --- the review page ----------------------------------------------------------------------------


def _review_values(data) -> dict[str, Any]:
    """Form fields as the service takes them; a value that is not what it should be is passed on for
    the service to refuse with its own message."""
    verdict = data.get("verdict", "")
    good = {"good": True, "bad": False}.get(verdict)
    score_raw = (data.get("score") or "").strip()
    return {
        "good": good,
        "rating": int(score_raw) if score_raw.isdigit() else (score_raw or None),
        "reasons": data.getlist("reasons"),
        "note": data.get("note", ""),
        "correction": data.get("correction", ""),
    }


def _item_context(request: HttpRequest, item: QueueItem, *, values=None, error=None) -> dict[str, Any]:
    now = timezone.now()
    context: dict[str, Any] = {
        **_header(request),
        "item": item,
        "row": selectors.queue_item_row(item, now=now),
        "held_by_other": item.claim_active(now) and item.claimed_by_id != request.user.pk,
        "reasons": Review.Reason.choices,
        "error": error,
        "correction_max_bytes": CORRECTION_MAX_BYTES,
        "note_max_chars": NOTE_MAX_CHARS,
        "filter_query": request.GET.urlencode(),
    }
    if item.message_id:
        reply = selectors.reply_context(item.message)
        draft = item.draft or {}
        values = values or {
            "good": draft.get("good"),
            "rating": draft.get("rating"),
            "reasons": draft.get("reasons") or [],
            "note": draft.get("note", ""),
            "correction": draft.get("correction", ""),
        }
        context.update(
            reply=reply,
            facts=reply.facts,
            values=values,
            history=[
                {"review": r, "diff": word_diff(item.message.body, r.corrected_body) if r.corrected_body else []}
                for r in reply.reviews
            ],
        )
    else:
        context.update(transcript=selectors.conversation_transcript(item.conversation))
    context["page_config"] = {
        "page": "item",
        "item": item.pk,
        "kind": item.kind,
        "open": item.is_open,
        "claim": not context["held_by_other"] and item.is_open,
        "conversation": str(item.conversation_id),
        "reply": item.message.body if item.message_id else "",
        "filters": request.GET.dict(),
    }
    return context


@require_GET
@agent_required
def item_page(request: HttpRequest, item_id: int) -> HttpResponse:
    try:
        item = selectors.queue_item_get(item_id)
    except ApplicationError as exc:
        return render(request, "workspace/error.html", {**_header(request), "message": exc.message}, status=404)
    return render(request, "workspace/item.html", _item_context(request, item))


@require_POST
@agent_required
def item_claim(request: HttpRequest, item_id: int) -> HttpResponse:
    try:
        item = review_services.queue_item_claim(item_id=item_id, agent=request.user)
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        messages.error(request, exc.message)
        return redirect(f"/agent/items/{item_id}/")
    if _wants_json(request):
        return JsonResponse({"item": item.pk, "until": item.lease_expires_at.isoformat()})
    return redirect(f"/agent/items/{item.pk}/")


@require_POST
@agent_required
def item_release(request: HttpRequest, item_id: int) -> HttpResponse:
    try:
        review_services.queue_item_release(item_id=item_id, agent=request.user)
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        messages.error(request, exc.message)
    if _wants_json(request):
        return JsonResponse({"item": item_id, "released": True})
    return redirect("workspace:queue")


@require_POST
@agent_required
def item_review(request: HttpRequest, item_id: int) -> HttpResponse:
    """Save a draft, submit (and go on to the next entry), or discard: ``action`` says which."""
    action = request.POST.get("action", "submit")
    values = _review_values(request.POST)
    try:
        item = selectors.queue_item_get(item_id)
        if action == "draft":
            review_services.review_draft_save(item_id=item.pk, agent=request.user, values=values)
            done = "Draft saved."
        elif action == "discard":
            review_services.queue_item_discard(item_id=item.pk, agent=request.user, note=request.POST.get("note", ""))
            done = "Discarded."
        elif action in ("submit", "submit_next"):
            if item.message_id is None:
                raise ApplicationError(
                    "A conversation waiting for a human is taken over, not rated.", code="bad_review"
                )
            review_services.review_submit(agent=request.user, message_id=item.message_id, item_id=item.pk, **values)
            done = "Review submitted."
        else:
            raise ApplicationError(f"Unknown action {action[:20]!r}; use draft, submit, submit_next or discard.")
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        if exc.code == "not_found":
            return render(request, "workspace/error.html", {**_header(request), "message": exc.message}, status=404)
        shown = {**values, "rating": values["rating"] if isinstance(values["rating"], int) else None}
        context = _item_context(request, selectors.queue_item_get(item_id), values=shown, error=exc)
        return render(request, "workspace/item.html", context, status=STATUS_BY_CODE.get(exc.code, 400))
    if action == "submit_next":
        # Straight to the next entry of the same queue and filters.
        filters = _filters_or_default(request.POST)
        following = review_services.queue_item_claim_next(agent=request.user, filters=filters, skip=_skipped(request))
        query = urlencode(filters.as_query())
        target = (f"/agent/items/{following.pk}/" if following is not None else "/agent/") + (
            f"?{query}" if query else ""
        )
        if following is None:
            messages.info(request, f"{done} Nothing left to review in this queue.")
        if _wants_json(request):
            return JsonResponse({"ok": True, "message": done, "next": target})
        return redirect(target)
    if _wants_json(request):
        return JsonResponse({"ok": True, "message": done})
    messages.success(request, done)
    return redirect(f"/agent/items/{item_id}/")


def _filters_or_default(data) -> selectors.QueueFilters:
    try:
        return selectors.queue_filters_parse(data)
    except ApplicationError:
        return selectors.QueueFilters()


@require_GET
@agent_required
def item_previous(request: HttpRequest, item_id: int) -> HttpResponse:
    item = get_object_or_404(QueueItem, pk=item_id)
    previous = selectors.queue_item_previous(agent=request.user, before=item)
    if previous is None:
        messages.info(request, "This is the first item you worked on.")
        return redirect(f"/agent/items/{item_id}/")
    return redirect(f"/agent/items/{previous.pk}/")


@require_POST
@agent_required
def message_flag(request: HttpRequest, message_id: int) -> HttpResponse:
    """Flag a bot reply for review ("flagged" queue); ``review=1`` opens its entry right away."""
    try:
        item, created = review_services.reply_flag(
            message_id=message_id, agent=request.user, note=request.POST.get("note", "")
        )
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        messages.error(request, exc.message)
        return redirect(_back_in_workspace(request, "/agent/conversations/"))
    if _wants_json(request):
        return JsonResponse({"item": item.pk, "created": created})
    if request.POST.get("review"):
        return redirect(f"/agent/items/{item.pk}/")
    messages.success(request, "Flagged for review." if created else "It was flagged already.")
    return redirect(_back_in_workspace(request, f"/agent/conversations/{item.conversation_id}/"))


def _back_in_workspace(request: HttpRequest, default: str) -> str:
    """The page a form came from, if it is a workspace page (never another site)."""
    back = request.POST.get("back", "")
    if back.startswith("/agent/") and url_has_allowed_host_and_scheme(back, allowed_hosts=None):
        return back
    return default


# --- conversations ------------------------------------------------------------------------------


@require_GET
@agent_required
def conversation_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    if status not in Conversation.Status.values:
        status = ""
    search = request.GET.get("q", "").strip()[:200]
    return render(
        request,
        "workspace/conversations.html",
        {
            **_header(request),
            "conversations": selectors.conversations_for_agents(status=status, search=search),
            "status": status,
            "search": search,
            "statuses": Conversation.Status.choices,
            "page_config": {"page": "conversations"},
        },
    )


def _conversation_context(request: HttpRequest, conversation: Conversation, error: str = "") -> dict[str, Any]:
    mine = conversation.status == Conversation.Status.WITH_AGENT and conversation.assigned_agent_id == request.user.pk
    return {
        **_header(request),
        "conversation": conversation,
        "transcript": selectors.conversation_transcript(conversation),
        "open_items": selectors.conversation_open_items(conversation),
        "mine": mine,
        "error": error,
        "page_config": {
            "page": "conversation",
            "conversation": str(conversation.pk),
            "status": conversation.status,
            "mine": mine,
            "agent_name": selectors.display_name(request.user),
        },
    }


@require_GET
@agent_required
def conversation_page(request: HttpRequest, conversation_id) -> HttpResponse:
    conversation = get_object_or_404(Conversation.objects.select_related("assigned_agent"), pk=conversation_id)
    return render(request, "workspace/conversation.html", _conversation_context(request, conversation))


def _conversation_action(request: HttpRequest, conversation_id, service, done: str) -> HttpResponse:
    try:
        conversation = service(conversation_id=conversation_id, agent=request.user)
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        if exc.code == "not_found":
            return render(request, "workspace/error.html", {**_header(request), "message": exc.message}, status=404)
        conversation = get_object_or_404(Conversation, pk=conversation_id)
        return render(
            request,
            "workspace/conversation.html",
            _conversation_context(request, conversation, error=exc.message),
            status=STATUS_BY_CODE.get(exc.code, 400),
        )
    if _wants_json(request):
        return JsonResponse({"ok": True, "status": conversation.status, "message": done})
    messages.success(request, done)
    return redirect(f"/agent/conversations/{conversation.pk}/")


@require_POST
@agent_required
def conversation_take_over(request: HttpRequest, conversation_id) -> HttpResponse:
    return _conversation_action(
        request, conversation_id, chat_services.conversation_take_over, "You have this conversation; the bot is quiet."
    )


@require_POST
@agent_required
def conversation_hand_back(request: HttpRequest, conversation_id) -> HttpResponse:
    return _conversation_action(
        request, conversation_id, chat_services.conversation_hand_back, "Handed back: the bot answers again."
    )


@require_POST
@agent_required
def conversation_close(request: HttpRequest, conversation_id) -> HttpResponse:
    return _conversation_action(request, conversation_id, chat_services.conversation_close, "Conversation closed.")


@require_POST
@agent_required
def conversation_send(request: HttpRequest, conversation_id) -> HttpResponse:
    """The composer without JavaScript (the page sends over the socket when it can)."""
    client_id = request.POST.get("client_id", "")
    try:
        message, _ = chat_services.message_create_agent(
            conversation_id=conversation_id, agent=request.user, client_id=client_id, text=request.POST.get("text", "")
        )
    except ApplicationError as exc:
        if _wants_json(request):
            return _error_json(exc)
        conversation = get_object_or_404(Conversation, pk=conversation_id)
        return render(
            request,
            "workspace/conversation.html",
            {**_conversation_context(request, conversation, error=exc.message), "draft": request.POST.get("text", "")},
            status=STATUS_BY_CODE.get(exc.code, 400),
        )
    if _wants_json(request):
        return JsonResponse({"ok": True, "id": message.pk})
    return redirect(f"/agent/conversations/{conversation_id}/")


# --- progress, agreement, the training set, export -------------------------------------------------


@require_GET
@agent_required
def stats_page(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "workspace/stats.html",
        {
            **_header(request),
            "progress": selectors.review_progress(),
            "agreement": selectors.agreement_report(),
            "page_config": {"page": "stats"},
        },
    )


@require_GET
@agent_required(permission=APPROVE_PERMISSION)
def training_page(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", TrainingCandidate.Status.PENDING)
    if status not in TrainingCandidate.Status.values:
        status = TrainingCandidate.Status.PENDING
    return render(
        request,
        "workspace/training.html",
        {
            **_header(request),
            "rows": selectors.training_candidates(status=status),
            "status": status,
            "statuses": TrainingCandidate.Status.choices,
            "counts": selectors.training_candidate_counts(),
            "page_config": {"page": "training"},
        },
    )


@require_POST
@agent_required(permission=APPROVE_PERMISSION)
def training_decide(request: HttpRequest) -> HttpResponse:
    ids = [int(pk) for pk in request.POST.getlist("candidate") if pk.isdigit()]
    approve = request.POST.get("decision") == "approve"
    try:
        result = review_services.training_candidates_decide(
            ids=ids, user=request.user, approve=approve, note=request.POST.get("note", "")
        )
    except ApplicationError as exc:
        messages.error(request, exc.message)
        return redirect("workspace:training")
    verb = "approved for the next dataset build" if approve else "rejected"
    skipped = f" {result['skipped']} were no longer pending and stayed as they were." if result["skipped"] else ""
    messages.success(request, f"{result['changed']} {verb}.{skipped}")
    return redirect("workspace:training")


@require_GET
@agent_required
def export_download(request: HttpRequest) -> HttpResponse:
    """Download reviews as CSV, JSON Lines, or a zipped ``datasets`` dataset (``?format=csv|jsonl|hf``)."""
    fmt = request.GET.get("format", "csv")
    if fmt not in FORMATS:
        return HttpResponse(
            f"Unknown format {fmt[:20]!r}; use csv, jsonl or hf.", status=400, content_type="text/plain"
        )
    latest_only = request.GET.get("latest") == "1"
    rows = selectors.feedback_export_rows(latest_only=latest_only)
    stamp = timezone.now().strftime("%Y%m%d-%H%M")
    if fmt in ("csv", "jsonl"):
        chunks = (csv_chunks if fmt == "csv" else jsonl_chunks)(rows, selectors.EXPORT_COLUMNS)
        response = StreamingHttpResponse(
            chunks, content_type="text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="supportbot-feedback-{stamp}.{fmt}"'
        return response
    # A zipped save_to_disk folder; built in a temporary folder and sent from memory
    # (a few MB for tens of thousands of reviews).
    with tempfile.TemporaryDirectory(prefix="feedback-hf-") as work:
        write_hf(rows, selectors.EXPORT_COLUMNS, Path(work) / "dataset")
        archive = shutil.make_archive(str(Path(work) / "supportbot-feedback"), "zip", root_dir=Path(work) / "dataset")
        data = Path(archive).read_bytes()
    return FileResponse(io.BytesIO(data), as_attachment=True, filename=f"supportbot-feedback-{stamp}-hf.zip")


# --- bias monitoring -------------------------------------------------------------------------


def _staff_only(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise PermissionDenied("The monitoring dashboard is for staff.")


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "rate":
        return f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _present(report: dict[str, Any]) -> dict[str, Any]:
    """Display strings for the template (the report itself stays numbers, for the charts and the CSV)."""
    units = {m["name"]: m["unit"] for m in report["metrics"]}
    for section in report["dimensions"]:
        for cell in section["cells"]:
            cell["shown"] = [
                {
                    "name": name,
                    "value": _shown(figure["value"], units[name]),
                    "interval": f"{_shown(figure['low'], units[name])}–{_shown(figure['high'], units[name])}"
                    if figure["n"]
                    else "",
                    "n": figure["n"],
                    "alert": name in cell["alerts"],
                    "small": 0 < figure["n"] < report["thresholds"]["min_n"],
                }
                for name, figure in cell["metrics"].items()
            ]
        for row in section["disaggregation"]:
            unit = units[row["metric"]]
            row["shown"] = {
                "overall": _shown(row["overall"], unit),
                "difference": _shown(row["difference"], unit),
                "ratio": "—" if row["ratio"] is None else f"{row['ratio']:.3f}",
                "difference_to_overall": _shown(row["difference_to_overall"], unit),
                "ratio_to_overall": "—" if row["ratio_to_overall"] is None else f"{row['ratio_to_overall']:.3f}",
                "groups": ", ".join(
                    f"{group} {_shown(value, unit)} (n={row['counts'].get(group, 0)})"
                    for group, value in row["by_group"].items()
                ),
            }
    for test in report["tests"]:
        unit = units[test["metric"]]
        test["shown"] = {
            "value": _shown(test["value"], unit),
            "interval": f"{_shown(test['low'], unit)}–{_shown(test['high'], unit)}",
            "rest": _shown(test["value_rest"], unit),
            "expected": _shown(test["expected"], unit),
            "p": "—" if test["p_adjusted"] is None else f"{test['p_adjusted']:.2g}",
        }
    for row in report["by_version"]:
        row["shown"] = [
            {"name": name, "value": _shown(f["value"], units[name]), "n": f["n"]} for name, f in row["metrics"].items()
        ]
    return report


@require_GET
@agent_required
def monitoring_page(request: HttpRequest) -> HttpResponse:
    """Bias monitoring: every segment x model version, with intervals, tests and alerts (staff only)."""
    _staff_only(request)
    filters = monitoring.MonitoringFilters.from_query(request.GET)
    report = monitoring.monitoring_report(filters, refresh=request.GET.get("refresh") == "1")
    chart = {
        "metrics": report["metrics"],
        "versions": [v["label"] for v in report["versions"]],
        "dimensions": [
            {"name": d["name"], "label": d["label"], "segments": d["segments"], "cells": d["cells"]}
            for d in report["dimensions"]
        ],
        "trend": report["trend"],
        "min_n": report["thresholds"]["min_n"],
    }
    query = urlencode([(k, value) for k, values in request.GET.lists() for value in values if k != "refresh"])
    return render(
        request,
        "workspace/monitoring.html",
        {
            **_header(request),
            "report": _present(report),
            "chart": chart,
            "filters": filters,
            "day_choices": [(7, "7 days"), (30, "30 days"), (90, "90 days"), (365, "a year"), ("all", "all time")],
            "all_versions": monitoring.monitoring_version_choices(),
            # The workers refresh the default window only; other windows are computed on view.
            "refresh_s": monitoring.monitoring_refresh_interval(),
            "window_refreshed": filters == monitoring.MonitoringFilters.from_query({}),
            "cache_s": settings.SUPPORTBOT_MONITORING_CACHE_S,
            "query": query,
            "page_config": {"page": "monitoring"},
        },
    )


@require_GET
@agent_required
def monitoring_csv(request: HttpRequest) -> HttpResponse:
    """The dashboard's figures as CSV: one row per dimension x segment x version x metric."""
    _staff_only(request)
    report = monitoring.monitoring_report(monitoring.MonitoringFilters.from_query(request.GET))
    chunks = csv_chunks(monitoring.monitoring_csv_rows(report), monitoring.CSV_COLUMNS)
    response = StreamingHttpResponse(chunks, content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M")
    response["Content-Disposition"] = f'attachment; filename="supportbot-monitoring-{stamp}.csv"'
    return response
