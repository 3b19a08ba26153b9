"""Chat pages, the chat-token endpoint, and the widget's static files."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.sessions.models import Session

from conversations.tokens import chat_token_mint, chat_token_read
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db

SESSION_URL = "/chat/session/"


def post_session(client, body=None, origin="http://testserver"):
    headers = {"HTTP_ORIGIN": origin} if origin else {}
    data = json.dumps(body) if body is not None else ""
    return client.post(SESSION_URL, data=data, content_type="application/json", **headers)


def test_the_token_endpoint_creates_a_session_and_signs_its_key(client):
    response = post_session(client)
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    key = chat_token_read(response.json()["token"])
    assert Session.objects.filter(session_key=key).exists()
    assert client.cookies["sessionid"].value == key  # first-party pages keep it as a cookie too


def test_a_held_token_keeps_its_session(client):
    first = post_session(client).json()["token"]
    renewed = post_session(client.__class__(), {"token": first}).json()["token"]  # a browser without the cookie
    assert chat_token_read(renewed) == chat_token_read(first)


def test_a_forged_token_gets_a_new_session(client):
    forged = chat_token_mint(session_key="victim-session") + "x"
    key = chat_token_read(post_session(client, {"token": forged}).json()["token"])
    assert key != "victim-session"
    assert Session.objects.filter(session_key=key).exists()


def test_the_cookie_session_is_used_when_no_token_is_held(client):
    first = chat_token_read(post_session(client).json()["token"])
    again = chat_token_read(post_session(client).json()["token"])
    assert again == first


def test_a_foreign_page_gets_no_token(client):
    response = post_session(client, origin="https://evil.example")
    assert response.status_code == 403
    assert "evil.example" in response.json()["message"]
    assert not Session.objects.exists()


def test_bad_json_is_refused_with_a_reason(client):
    response = client.post(SESSION_URL, data="{nope", content_type="application/json", HTTP_ORIGIN="http://testserver")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_json"


def test_the_token_endpoint_only_takes_post(client):
    assert client.get(SESSION_URL).status_code == 405


def test_the_chat_page_and_the_embed_page(client):
    page = client.get("/chat/")
    assert page.status_code == 200
    assert page["X-Frame-Options"] == "DENY"  # the site's own pages are never framed
    assert b"supportbot/chat.js" in page.content

    embed = client.get("/chat/embed/?segment=pro&page=https://shop.example/cart")
    assert embed.status_code == 200
    assert "X-Frame-Options" not in embed  # any site may frame the widget's panel
    assert embed["Content-Security-Policy"] == "frame-ancestors *"
    config = json.loads(re.search(rb'id="supportbot-chat-config"[^>]*>(.*?)</script>', embed.content).group(1))
    assert config["embedded"] is True
    assert (config["segment"], config["page"]) == ("pro", "https://shop.example/cart")
    assert config["maxChars"] == 4096
    assert b'aria-live="polite"' in embed.content


def test_the_embed_page_may_be_limited_to_some_sites(client, settings):
    settings.SUPPORTBOT_WIDGET_FRAME_ANCESTORS = ["https://shop.example", "https://*.shop.example"]
    embed = client.get("/chat/embed/")
    assert embed["Content-Security-Policy"] == "frame-ancestors https://shop.example https://*.shop.example"


@pytest.mark.parametrize("name", ["widget.js", "chat.js"])
def test_the_widget_scripts_are_served_and_never_write_html(client, name):
    response = client.get(f"/static/supportbot/{name}")
    assert response.status_code == 200
    source = (ROOT / "static" / "supportbot" / name).read_text()
    # Text from customers and the model reaches the page through textContent only.
    assert not re.search(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write", source)
    code = source.split("*/", 1)[1]  # after the header comment
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", code)  # nothing from another host (CDN)


def test_the_panel_at_a_host_the_server_does_not_answer_to_says_so_in_one_line(client, settings, caplog):
    settings.DEBUG = True  # where Django would show its DisallowedHost debug page
    settings.ALLOWED_HOSTS = ["support.example"]
    response = client.get("/chat/embed/", HTTP_HOST="shop<script>.example:8000")
    assert response.status_code == 400
    assert response["Content-Security-Policy"] == "frame-ancestors *"  # shown inside the widget, too
    page = response.content.decode()
    assert "Chat unavailable: this chat server is not set up to answer at shop&lt;script&gt;.example." in page
    assert "<script>.example" not in page  # the header is escaped everywhere, the JSON included
    assert "DisallowedHost" not in page
    assert "not in DJANGO_ALLOWED_HOSTS" in caplog.text
    # Other pages keep Django's own refusal.
    assert client.get("/chat/", HTTP_HOST="shop.example").status_code == 400
