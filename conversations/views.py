"""Chat pages: the full-page chat, the widget's iframe panel, and the chat-token endpoint.

- ``GET /chat/``: the chat as a page of this site.
- ``GET /chat/embed/``: the same chat, bare, for the iframe that ``widget.js`` puts on
  any site. It may be framed by other sites (``SUPPORTBOT_WIDGET_FRAME_ANCESTORS``).
- ``POST /chat/session/``: creates the anonymous customer's session and returns a
  signed chat token for the websocket (docs/protocol.md, "Sessions and tokens").
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.request import split_domain_port, validate_host
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .tokens import chat_token_mint, chat_token_read


def _chat_config(request: HttpRequest, *, embedded: bool) -> dict:
    return {
        "sessionUrl": "/chat/session/",
        "wsPath": "/ws/chat/",
        "embedded": embedded,
        "maxChars": settings.SUPPORTBOT_MAX_MESSAGE_CHARS,
        # Reported by the page that embeds the widget; stored on a new conversation.
        "segment": request.GET.get("segment", "")[:64],
        "page": request.GET.get("page", "")[:500],
    }


@require_GET
def chat_page(request: HttpRequest) -> HttpResponse:
    return render(request, "conversations/chat.html", {"chat_config": _chat_config(request, embedded=False)})


@require_GET
@xframe_options_exempt
def chat_embed(request: HttpRequest) -> HttpResponse:
    response = render(request, "conversations/embed.html", {"chat_config": _chat_config(request, embedded=True)})
    response["Content-Security-Policy"] = "frame-ancestors " + " ".join(settings.SUPPORTBOT_WIDGET_FRAME_ANCESTORS)
    return response


def _origin_allowed(origin: str) -> bool:
    host = urlsplit(origin).netloc
    domain, _port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS or ([".localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return bool(domain) and validate_host(domain, allowed)


# Exempt from the CSRF cookie check because the widget's panel is a cross-site iframe,
# where browsers do not send SameSite=Lax cookies (the CSRF cookie included). The
# Origin check below takes its place: browsers always send Origin on POST, so only
# pages of this site can get a token for a browser. The response is not readable
# cross-origin (no CORS headers), and all it grants is an anonymous chat identity.
@csrf_exempt
@require_POST
@never_cache
def chat_session(request: HttpRequest) -> JsonResponse:
    """Return ``{"token", "max_age"}``: the caller's chat token, renewed, or one for a new session.

    Body (optional JSON): ``{"token": "<the token the page already has>"}``. A valid
    token keeps its session, so the customer keeps their history; otherwise the
    session cookie's session is used, or a new session is created.
    """
    origin = request.headers.get("Origin")
    if origin is not None and not _origin_allowed(origin):
        return JsonResponse(
            {
                "error": "forbidden_origin",
                "message": f"Chat tokens are only issued to pages of this site, not {origin}.",
            },
            status=403,
        )
    held = ""
    if request.body:
        try:
            payload = json.loads(request.body)
        except ValueError:
            return JsonResponse(
                {"error": "bad_json", "message": 'The body must be JSON, e.g. {"token": "..."}, or empty.'},
                status=400,
            )
        held = payload.get("token") if isinstance(payload, dict) and isinstance(payload.get("token"), str) else ""
    session_key = chat_token_read(held) if held else None
    if session_key is None:
        if request.session.session_key is None:
            # A marker, so the session is saved and its cookie set (first-party pages use it).
            request.session["supportbot_chat"] = True
            request.session.save()
        session_key = request.session.session_key
    return JsonResponse(
        {"token": chat_token_mint(session_key=session_key), "max_age": settings.SUPPORTBOT_CHAT_TOKEN_MAX_AGE}
    )
