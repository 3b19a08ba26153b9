"""Project-level pages: the landing page and the health endpoint."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from .health import health_report


async def healthz(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 or 503 with what is down; why only for staff or with SUPPORTBOT_HEALTHZ_DETAILS."""
    details = settings.SUPPORTBOT_HEALTHZ_DETAILS or (await request.auser()).is_staff
    healthy, report = await health_report(details=details)
    return JsonResponse(report, status=200 if healthy else 503)


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")
