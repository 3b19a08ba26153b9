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


def conversation_frame(conversation: Conversation, *, bot_available: bool) -> dict[str, Any]:
    """Sent once when a socket opens: which conversation it is and who answers it."""
    frame = {
        "type": "conversation",
        "id": str(conversation.pk),
        "status": conversation.status,
        "handoff_reason": conversation.handoff_reason,
        "bot_available": bot_available,
    }
    return _with_agent_name(frame, conversation)


def typing_frame(*, role: str, name: str = "") -> dict[str, Any]:
    frame = {"type": "typing", "role": role}
    if name:
        frame["name"] = name
    return frame


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}
