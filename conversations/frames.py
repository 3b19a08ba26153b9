"""The server frames of the chat protocol (docs/protocol.md), built from model rows.

One place turns rows into the JSON the widget reads, so the consumer, the services'
broadcasts and ``resume`` all send the same shape.
"""

from __future__ import annotations

from typing import Any

from .models import Conversation, Message


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


def handoff_frame(conversation: Conversation) -> dict[str, Any]:
    return {"type": "handoff", "status": conversation.status, "reason": conversation.handoff_reason}


def conversation_frame(conversation: Conversation | None, *, bot_available: bool) -> dict[str, Any]:
    """Sent when a socket opens, and again when its conversation starts: which one it is, who answers.

    ``id`` is null until the customer's first message starts a conversation.
    """
    return {
        "type": "conversation",
        "id": str(conversation.pk) if conversation is not None else None,
        "status": conversation.status if conversation is not None else Conversation.Status.BOT,
        "handoff_reason": conversation.handoff_reason if conversation is not None else "",
        "bot_available": bot_available,
    }


def typing_frame(*, role: str) -> dict[str, Any]:
    return {"type": "typing", "role": role}


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}
