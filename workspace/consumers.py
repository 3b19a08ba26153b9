"""The agents' socket: live queues and waiting count, and one live conversation an agent works in.

``/ws/agent/`` carries what every workspace page shows live: the number of
customers waiting for a human (``waiting``), new and changed queue entries
(``queue_item``), a customer asking for a person (``handoff_requested``).
``/ws/agent/conversations/<uuid>/`` adds that conversation's frames (the customer's
messages, the bot's tokens, typing, status changes: the chat protocol's own frames,
docs/protocol.md) and lets the agent who has it write and show that they are typing.

Only signed-in users with the ``review_conversations`` permission may connect (the
session cookie of the workspace page); anyone else gets an ``error`` frame and close
code 4403. ``AllowedHostsOriginValidator`` (``asgi.py``) has already refused foreign
Origins. Every client frame is parsed, handed to one service, and answered; a bad
frame gets an ``error`` frame and the socket stays open.

Client frames: ``{"type": "renew", "item": <id>}`` (keep a claim alive),
``{"type": "counts"}``, and on a conversation socket ``{"type": "resume", "after":
<message id>}`` (what the page missed, then a ``handoff`` frame with the status),
``{"type": "typing"}`` and ``{"type": "message", "client_id": "...", "text": "..."}``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from conversations import frames
from conversations import services as chat_services
from conversations.broadcast import AGENTS_GROUP
from conversations.models import Conversation
from conversations.review import selectors
from conversations.review import services as review_services
from conversations.selectors import messages_after
from supportbot.errors import ApplicationError

log = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
PERMISSION = "conversations.review_conversations"
TYPING_MIN_INTERVAL_S = 2.0  # relay the agent's "typing" at most this often, like the customer's
MAX_FRAME_CHARS = 16_384  # a message of 4,096 characters, JSON-escaped, fits many times over


def _allowed(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.has_perm(PERMISSION))


def _hello(user) -> dict[str, Any]:
    return {
        "type": "hello",
        "agent": selectors.display_name(user),
        "waiting": selectors.waiting_count(),
        "queues": selectors.queue_counts(),
    }


def _conversation_for(conversation_id) -> Conversation | None:
    return Conversation.objects.filter(pk=conversation_id).first()


def _since(conversation_id, after: int) -> tuple[list, Conversation]:
    conversation = Conversation.objects.get(pk=conversation_id)
    return list(messages_after(conversation=conversation, after_id=after)[:500]), conversation


def _holds(conversation_id, user) -> bool:
    return Conversation.objects.filter(
        pk=conversation_id, status=Conversation.Status.WITH_AGENT, assigned_agent=user
    ).exists()


class AgentConsumer(AsyncJsonWebsocketConsumer):
    user = None
    conversation: Conversation | None = None
    joined: tuple[str, ...] = ()

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        self._last_typing = 0.0
        self.user = self.scope.get("user")
        if not await database_sync_to_async(_allowed)(self.user):
            await self._refuse(CLOSE_FORBIDDEN, "forbidden", "The agent workspace is for support agents and admins.")
            return
        groups = [AGENTS_GROUP]
        conversation_id = self.scope["url_route"]["kwargs"].get("conversation_id")
        if conversation_id is not None:
            self.conversation = await database_sync_to_async(_conversation_for)(conversation_id)
            if self.conversation is None:
                await self._refuse(CLOSE_NOT_FOUND, "not_found", "There is no such conversation.")
                return
            groups.append(self.conversation.group_name)
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.joined = tuple(groups)
        await self.accept()
        await self.send_json(await database_sync_to_async(_hello)(self.user))

    async def _refuse(self, code: int, error_code: str, message: str) -> None:
        # Accepted first, so the page can tell "not allowed" (4403) from a network failure.
        await self.accept()
        await self.send_json(frames.error_frame(error_code, message))
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        for group in self.joined:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:  # noqa: BLE001 - leaving must never raise; the layer expires members anyway
                log.warning("Leaving group %s failed", group, exc_info=True)
        self.joined = ()

    # --- frames from the agent's page ----------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        if not self.joined:
            return
        if text_data is None:
            await self._error("bad_frame", "Frames must be JSON text, not binary.")
            return
        if len(text_data) > MAX_FRAME_CHARS:
            await self._error("too_long", f"Frames are limited to {MAX_FRAME_CHARS} characters.")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self._error("bad_json", 'The frame is not valid JSON. Send an object like {"type": "counts"}.')
            return
        if not isinstance(content, dict) or not isinstance(content.get("type"), str):
            await self._error("bad_frame", "A frame must be a JSON object with a string 'type'.")
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs) -> None:
        handler = {
            "renew": self._on_renew,
            "counts": self._on_counts,
            "typing": self._on_typing,
            "message": self._on_message,
            "resume": self._on_resume,
        }.get(content["type"])
        if handler is None:
            await self._error(
                "unknown_type",
                f"Unknown frame type {content['type'][:40]!r}; use renew, counts, resume, typing or message.",
            )
            return
        try:
            await handler(content)
        except ApplicationError as exc:
            await self._error(exc.code, exc.message, **exc.extra)
        except Exception:
            log.exception("Agent frame %s failed", content["type"])
            await self._error("server_error", "Something went wrong on our side; try again shortly.")

    async def _on_renew(self, content: dict[str, Any]) -> None:
        item_id = content.get("item")
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            await self._error("bad_frame", "renew needs 'item': the id of the queue item you hold.")
            return
        item = await database_sync_to_async(review_services.queue_item_renew)(item_id=item_id, agent=self.user)
        await self.send_json({"type": "claim", "item": item.pk, "until": item.lease_expires_at.isoformat()})

    async def _on_counts(self, content: dict[str, Any]) -> None:
        await self.send_json(await database_sync_to_async(_hello)(self.user))

    def _conversation_required(self) -> Conversation:
        if self.conversation is None:
            raise ApplicationError(
                "Open the conversation's socket (/ws/agent/conversations/<id>/) to write in it.", code="bad_frame"
            )
        return self.conversation

    async def _on_resume(self, content: dict[str, Any]) -> None:
        """Replay the conversation's messages after ``after`` (what arrived while the page loaded), then its status."""
        conversation = self._conversation_required()
        after = content.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            await self._error("bad_frame", "resume needs 'after': the id of the last message the page shows.")
            return
        missed, current = await database_sync_to_async(_since)(conversation.pk, after)
        for message in missed:
            await self.send_json(frames.message_frame(message))
        await self.send_json(frames.handoff_frame(current))

    async def _on_typing(self, content: dict[str, Any]) -> None:
        conversation = self._conversation_required()
        now = time.monotonic()
        if now - self._last_typing < TYPING_MIN_INTERVAL_S:
            return
        self._last_typing = now
        if not await database_sync_to_async(_holds)(conversation.pk, self.user):
            return  # only the agent who has the conversation shows as typing to the customer
        frame = frames.typing_frame(role="agent", name=selectors.display_name(self.user))
        await self.channel_layer.group_send(
            conversation.group_name, {"type": "chat.typing", "frame": frame, "origin": self.channel_name}
        )

    async def _on_message(self, content: dict[str, Any]) -> None:
        conversation = self._conversation_required()
        client_id, text = content.get("client_id"), content.get("text")
        if not isinstance(client_id, str) or not isinstance(text, str):
            extra = {"client_id": client_id} if isinstance(client_id, str) else {}
            await self._error("bad_frame", "A message frame needs 'client_id' and 'text' strings.", **extra)
            return
        if len(text) > settings.SUPPORTBOT_MAX_MESSAGE_CHARS * 2:
            await self._error("too_long", "The message is far over the length limit.", client_id=client_id[:64])
            return
        message, _ = await database_sync_to_async(chat_services.message_create_agent)(
            conversation_id=conversation.pk, agent=self.user, client_id=client_id, text=text
        )
        await self.send_json(frames.message_frame(message))

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self.send_json(frames.error_frame(code, message, **extra))

    # --- channel-layer events ------------------------------------------------------------------

    async def agents_queue(self, event: dict[str, Any]) -> None:
        await self.send_json(event["frame"])

    async def agents_waiting(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "waiting", "count": event["count"]})

    async def agents_handoff(self, event: dict[str, Any]) -> None:
        await self.send_json(
            {"type": "handoff_requested", "conversation": event["conversation"], "reason": event["reason"]}
        )

    async def _relay(self, event: dict[str, Any]) -> None:
        if event.get("origin") == self.channel_name:
            return
        await self.send_json(event["frame"])

    async def chat_tokens(self, event: dict[str, Any]) -> None:
        if event.get("origin") == self.channel_name:
            return
        for frame in event["frames"]:
            await self.send_json(frame)

    # The conversation group's events carry ready chat-protocol frames.
    chat_message = _relay
    chat_token = _relay
    chat_reply_done = _relay
    chat_handoff = _relay
    chat_typing = _relay
