"""The frames of the chat protocol (docs/protocol.md): the client's, checked, and the server's, built.

``client_frame_parse`` is the one place a client's frame is checked before anything
reads it (its shape; the rules on its content are the services'). The rest turns rows
into the JSON the widget reads, so the consumer, the services' broadcasts and
``resume`` all send the same shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from supportbot.errors import ApplicationError

from .models import Conversation, Message

# No frame of the protocol nests deeper than 2; Python's JSON parser recurses once per
# level and fails past about a thousand, so deeper text is refused before it is parsed.
MAX_FRAME_DEPTH = 16
# A JSON string (to its end, or to the end of the text if unterminated) or a bracket.
# Possessive quantifiers: no backtracking, so hostile text is scanned in linear time.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than ``limit`` (linear time, no recursion)."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


# What no stored text may hold: NUL (PostgreSQL refuses it in text and JSON) and UTF-16
# surrogates, which in a decoded string are always unpaired ones (JSON's "\ud800"
# alone; a valid pair decodes to one character) and cannot be encoded as UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_character(value: str) -> str | None:
    """What in ``value`` cannot be stored ("a NUL character", "an unpaired surrogate"), or None."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else f"an unpaired surrogate (U+{ord(found.group()):04X})"


def client_frame_parse(text: str | None) -> dict[str, Any]:
    """A client's websocket text as a frame: a JSON object with a string ``type``.

    Its top-level strings hold nothing that cannot be stored (``unstorable_character``).
    Raises ``ApplicationError`` (``bad_json``, ``bad_frame``, the latter with ``field``
    where one field is at fault) saying what to send instead.
    """
    if text is None:
        raise ApplicationError("Frames must be JSON text, not binary.", code="bad_frame")
    if _nesting_exceeds(text, MAX_FRAME_DEPTH):
        raise ApplicationError(
            f"The frame is nested more than {MAX_FRAME_DEPTH} levels deep; "
            'send a flat object like {"type": "message", "client_id": "...", "text": "..."}.',
            code="bad_frame",
        )
    try:
        content = json.loads(text)
    except ValueError:
        raise ApplicationError(
            'The frame is not valid JSON. Send an object like {"type": "message"}.', code="bad_json"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("type"), str):
        raise ApplicationError("A frame must be a JSON object with a string 'type'.", code="bad_frame")
    for field, value in content.items():
        problem = unstorable_character(value) if isinstance(value, str) else None
        if problem is not None:
            raise ApplicationError(
                f"The frame's '{field[:40]}' contains {problem}; send text without it.",
                code="bad_frame",
                extra={"field": field[:40], **client_echo(content)},
            )
    return content


def client_echo(content: dict[str, Any]) -> dict[str, Any]:
    """What an error about ``content`` repeats of it: its ``client_id``, so the client knows which message."""
    client_id = content.get("client_id")
    return {"client_id": client_id} if isinstance(client_id, str) else {}


def client_parameter(query: dict[str, list[str]], name: str, limit: int) -> tuple[str, str | None]:
    """A socket URL's query parameter, cut to ``limit``: ``(value, problem)``.

    A value that cannot be stored is ignored (``""``) and ``problem`` says why.
    """
    value = (query.get(name) or [""])[0][:limit]
    problem = unstorable_character(value)
    if problem is not None:
        return "", f"The '{name}' parameter contains {problem}; it was ignored."
    return value, None


def message_frame(message: Message, *, body: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """A ``message`` frame: an upsert of one message, by its server ``id``.

    For a reply still streaming, ``body`` is the text so far and ``seq`` the number of
    ``token`` frames it already contains (later ``token`` frames continue from there).
    """
    generation = message.generation or {}
    frame: dict[str, Any] = {
        "type": "message",
        "id": message.pk,
        "client_id": message.client_id,
        "role": message.role,
        "body": message.body if body is None else body,
        "status": message.status,
        "created_at": message.created_at.isoformat(),
        "in_reply_to": message.in_reply_to_id,
        "model_version": generation.get("model_label"),
        "helpful": message.helpful,
    }
    if message.status == Message.Status.STREAMING:
        frame["seq"] = int(generation.get("seq", 0)) if seq is None else seq
    if message.role == Message.Role.AGENT:
        frame["author_name"] = generation.get("author_name", "")
    return frame


def reply_done_frame(message: Message) -> dict[str, Any]:
    """The end of a streamed reply: its final text replaces whatever tokens arrived."""
    generation = message.generation or {}
    return {
        "type": "reply_done",
        "id": message.pk,
        "model_version": generation.get("model_label"),
        "status": message.status,
        "body": message.body,
        "finish_reason": generation.get("finish_reason", ""),
    }


def token_frame(*, reply_id: int, delta: str, seq: int) -> dict[str, Any]:
    return {"type": "token", "id": reply_id, "delta": delta, "seq": seq}


def _with_agent_name(frame: dict[str, Any], conversation: Conversation) -> dict[str, Any]:
    """Add ``agent_name`` (the agent's display name) while an agent has the conversation."""
    if conversation.status == Conversation.Status.WITH_AGENT and conversation.agent_display_name:
        frame["agent_name"] = conversation.agent_display_name
    return frame


def handoff_frame(conversation: Conversation) -> dict[str, Any]:
    """Who answers the conversation now; with ``agent_name`` while an agent has it."""
    frame = {"type": "handoff", "status": conversation.status, "reason": conversation.handoff_reason}
    return _with_agent_name(frame, conversation)


def conversation_frame(conversation: Conversation | None, *, bot_available: bool) -> dict[str, Any]:
    """Sent when a socket opens, and again when its conversation starts: which one it is, who answers.

    ``id`` is null until the customer's first message starts a conversation; ``agent_name``
    is there while an agent has it.
    """
    frame = {
        "type": "conversation",
        "id": str(conversation.pk) if conversation is not None else None,
        "status": conversation.status if conversation is not None else Conversation.Status.BOT,
        "handoff_reason": conversation.handoff_reason if conversation is not None else "",
        "bot_available": bot_available,
    }
    return _with_agent_name(frame, conversation) if conversation is not None else frame


def typing_frame(*, role: str, name: str = "") -> dict[str, Any]:
    frame = {"type": "typing", "role": role}
    if name:
        frame["name"] = name
    return frame


# An echoed client_id is cut to the longest a valid one can be (an invalid one may be huge).
ECHO_CLIENT_ID_MAX = 64


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    if isinstance(extra.get("client_id"), str):
        extra["client_id"] = extra["client_id"][:ECHO_CLIENT_ID_MAX]
    return {"type": "error", "code": code, "message": message, **extra}
