"""Signed chat tokens: how an anonymous customer's socket proves which session it belongs to.

A websocket cannot set a cookie, and the widget's chat panel is an iframe that a
foreign site embeds, where browsers drop SameSite=Lax cookies (and, more and more,
all third-party cookies). So the panel asks ``POST /chat/session/`` for a token: the
Django session key, signed with ``SECRET_KEY`` and timestamped. The panel keeps it in
its own (origin-partitioned) storage and passes it when it opens the socket.

The token is an anonymous identity, not a login: it lets its holder read and write
the chats of that session only. See docs/protocol.md, "Sessions and tokens".
"""

from __future__ import annotations

from django.conf import settings
from django.core import signing

_SALT = "conversations.chat-token"


def chat_token_mint(*, session_key: str) -> str:
    return signing.dumps({"s": session_key}, salt=_SALT, compress=False)


def chat_token_read(token: str) -> str | None:
    """The session key inside a valid, unexpired token, or None."""
    try:
        payload = signing.loads(token, salt=_SALT, max_age=settings.SUPPORTBOT_CHAT_TOKEN_MAX_AGE)
    except signing.BadSignature:  # also SignatureExpired, its subclass
        return None
    key = payload.get("s") if isinstance(payload, dict) else None
    return key if isinstance(key, str) and key else None
