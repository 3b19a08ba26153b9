"""Project-level pages: the landing page and the health endpoint."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from .health import health_report


async def healthz(request: HttpRequest) -> JsonResponse:
    healthy, report = await health_report()
    return JsonResponse(report, status=200 if healthy else 503)


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")
