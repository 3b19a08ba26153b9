"""A readable refusal for the widget's chat panel when the server does not answer to its host.

``widget.js`` is served by WhiteNoise whatever the Host header says, so a site can embed
it from an address the server was not told about (``DJANGO_ALLOWED_HOSTS``). The panel
(``/chat/embed/``) is then refused by Django's host check, and the customer would see
a bare "Bad Request (400)" or, with DEBUG on, the DisallowedHost debug page inside the
widget. This middleware, first in ``MIDDLEWARE``, answers that request instead with one
line for the customer, and logs the fix for whoever embeds the widget (server log and
browser console). Other paths keep Django's own handling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse

log = logging.getLogger(__name__)


def _host_fix(host: str) -> str:
    return (
        f"SupportBot: the chat server refused the host {host!r} because it is not in DJANGO_ALLOWED_HOSTS. "
        f"Add it on the server, keeping the hosts already listed (setting DJANGO_ALLOWED_HOSTS replaces the "
        f"defaults), e.g. DJANGO_ALLOWED_HOSTS={host},localhost,127.0.0.1. The sites that embed the widget do not "
        f"go there (see SUPPORTBOT_WIDGET_FRAME_ANCESTORS)."
    )


def embed_host_check(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    def middleware(request: HttpRequest) -> HttpResponse:
        if request.path_info != reverse("chat-embed"):
            return get_response(request)
        try:
            request.get_host()
        except DisallowedHost:
            # The raw header, cut short and without its port: it is only echoed (escaped) and logged.
            host = request.META.get("HTTP_HOST", "")[:200].rsplit(":", 1)[0] or "(none)"
            fix = _host_fix(host)
            log.warning("%s Allowed now: %s", fix, ", ".join(settings.ALLOWED_HOSTS) or "(none)")
            response = HttpResponse(
                render_to_string("conversations/embed_unavailable.html", {"host": host, "fix": fix}), status=400
            )
            response["Content-Security-Policy"] = "frame-ancestors " + " ".join(
                settings.SUPPORTBOT_WIDGET_FRAME_ANCESTORS
            )
            return response
        return get_response(request)

    return middleware
