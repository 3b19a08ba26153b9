"""The customer's chat socket: parse a frame, call one service, answer (docs/protocol.md).

``/ws/chat/`` opens the customer's open conversation, or none yet: a conversation
starts at the customer's first message (or "Talk to a human"), and the customer's other
sockets hear of it through their customer group. ``/ws/chat/<uuid>/`` opens a given
conversation, which must be theirs (else close code 4403). The
customer is identified by a signed chat token (``?token=``, from ``POST
/chat/session/``) or the session cookie, and by the signed-in user if any; no
identity closes with 4401. ``AllowedHostsOriginValidator`` (``asgi.py``) has
already refused foreign Origins.

Every frame sent to the socket that caused it is sent straight to it; the same
frames reach the conversation's other sockets through its channel-layer group,
and copies of frames this socket already has are skipped. Bad frames get an
``error`` frame and the socket stays open.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from finetune.selectors import model_version_active
from supportbot.errors import ApplicationError

from . import frames, lifecycle, replies, services
from .models import Conversation, Message
from .ratelimit import rate_limit_for, rate_limit_hit
from .tokens import chat_token_read

log = logging.getLogger(__name__)

CLOSE_NO_SESSION = 4401
CLOSE_FORBIDDEN = 4403
TYPING_MIN_INTERVAL_S = 2.0  # relay a customer's "typing" at most this often


def _header_text(headers: dict[bytes, bytes], name: bytes, limit: int) -> str:
    """A request header as text to keep (control characters, NUL included, dropped)."""
    text = headers.get(name, b"").decode("latin-1")[:limit]
    return "".join(char for char in text if char >= " " and char != "\x7f")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    conversation = None  # None until the customer's first message starts one
    opened = False  # accepted with an identity (a refused socket is accepted only to say why)
    closed = False
    customer_group = None  # joined while the socket has no conversation

    # --- connection ------------------------------------------------------------

    async def connect(self) -> None:
        self._recent_direct: collections.deque[str] = collections.deque(maxlen=128)
        self._last_typing = 0.0
        self._rechecks: set[asyncio.Task] = set()
        if lifecycle.draining:  # the server is stopping: refused, the client retries (another one)
            await self.close()
            self.closed = True
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        if token:
            self.session_key = chat_token_read(token) or ""
            if not self.session_key:
                await self._refuse(
                    CLOSE_NO_SESSION,
                    "session_expired",
                    "The chat token is invalid or expired. Reload the page to get a new one.",
                )
                return
        else:
            session = self.scope.get("session")
            self.session_key = (session.session_key if session is not None else None) or ""
        self.user = self.scope.get("user")
        self.rate_key = f"u{self.user.pk}" if self.user is not None and self.user.is_authenticated else self.session_key
        headers = dict(self.scope.get("headers") or [])
        segment, segment_problem = frames.client_parameter(query, "segment", 64)
        page, page_problem = frames.client_parameter(query, "page", 500)
        # Kept on the conversation if this socket starts one.
        self.opening = {
            "segment": segment,
            "metadata": {
                "page": page,
                "user_agent": _header_text(headers, b"user-agent", 300),
                "locale": _header_text(headers, b"accept-language", 100),
            },
        }
        try:
            conversation = await database_sync_to_async(services.conversation_open_for_session)(
                session_key=self.session_key,
                user=self.user,
                conversation_id=self.scope["url_route"]["kwargs"].get("conversation_id"),
                create=False,
            )
        except ApplicationError as exc:
            code = CLOSE_FORBIDDEN if exc.code == "forbidden" else CLOSE_NO_SESSION
            await self._refuse(code, exc.code, exc.message)
            return
        if conversation is not None:
            await self.channel_layer.group_add(conversation.group_name, self.channel_name)
            self.conversation = conversation
        else:
            self.customer_group = services.customer_group_name(session_key=self.session_key, user=self.user)
            await self.channel_layer.group_add(self.customer_group, self.channel_name)
        await self.accept()
        self.opened = True
        await self._send_conversation()
        for field, problem in (("segment", segment_problem), ("page", page_problem)):
            if problem is not None:
                await self._error("bad_parameter", problem, field=field)

    async def _send_conversation(self) -> None:
        bot_available = await database_sync_to_async(model_version_active)() is not None
        await self.send_json(frames.conversation_frame(self.conversation, bot_available=bot_available))

    async def _join(self, conversation: Conversation) -> None:
        """This socket's conversation has started: follow it, and tell the client (which then resumes)."""
        await self.channel_layer.group_add(conversation.group_name, self.channel_name)
        self.conversation = conversation
        if self.customer_group is not None:
            await self.channel_layer.group_discard(self.customer_group, self.channel_name)
            self.customer_group = None
        await self._send_conversation()

    async def _started_conversation(self) -> Conversation:
        """The socket's conversation, started now if the customer has none open."""
        if self.conversation is None:
            conversation = await database_sync_to_async(services.conversation_open_for_session)(
                session_key=self.session_key, user=self.user, create=True, **self.opening
            )
            await self._join(conversation)
        return self.conversation

    async def _refuse(self, code: int, error_code: str, message: str) -> None:
        # Accept first: a close before accepting reaches the client as a bare HTTP 403,
        # and the client could not tell "not yours" from "log in again".
        await self.accept()
        await self.send_json(frames.error_frame(error_code, message))
        await self.close(code=code)
        self.closed = True

    async def disconnect(self, code: int) -> None:
        self.closed = True
        for task in self._rechecks if hasattr(self, "_rechecks") else ():
            task.cancel()
        if self.conversation is not None:
            await self.channel_layer.group_discard(self.conversation.group_name, self.channel_name)
        if self.customer_group is not None:
            await self.channel_layer.group_discard(self.customer_group, self.channel_name)

    # --- frames from the client ------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        if not self.opened or self.closed:
            return
        try:
            content = frames.client_frame_parse(text_data)
        except ApplicationError as exc:
            await self._error(exc.code, exc.message, **exc.extra)
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs) -> None:
        handler = {
            "message": self._on_message,
            "resume": self._on_resume,
            "typing": self._on_typing,
            "request_human": self._on_request_human,
            "csat": self._on_csat,
        }.get(content["type"])
        if handler is None:
            await self._error(
                "unknown_type",
                f"Unknown frame type {content['type'][:40]!r}; use message, resume, typing, request_human or csat.",
            )
            return
        try:
            await handler(content)
        except ApplicationError as exc:
            await self._error(exc.code, exc.message, **{**frames.client_echo(content), **exc.extra})
        except Exception:
            log.exception(
                "Chat frame %s failed in conversation %s", content["type"], getattr(self.conversation, "pk", None)
            )
            await self._error(
                "server_error",
                "Something went wrong on our side. A message the chat showed as sent is saved; try again shortly.",
                **frames.client_echo(content),
            )

    async def _rate_limited(self, bucket: str, client_id: Any = None) -> bool:
        limit = rate_limit_for(bucket)
        retry_after = await rate_limit_hit(key=f"{bucket}:{self.rate_key}", limit=limit)
        if retry_after is None:
            return False
        extra: dict[str, Any] = {"retry_after": retry_after}
        if isinstance(client_id, str):
            extra["client_id"] = client_id
        what = "messages" if bucket == "msg" else "requests"
        await self._error(
            "rate_limited",
            f"Too many {what}; at most {limit} a minute. Wait {retry_after:.0f} s; unsent messages are kept.",
            **extra,
        )
        return True

    async def _on_message(self, content: dict[str, Any]) -> None:
        client_id = content.get("client_id")
        if not isinstance(content.get("text"), str) or not isinstance(client_id, str):
            raise ApplicationError("A message frame needs 'client_id' and 'text' strings.", code="bad_frame")
        if await self._rate_limited("msg", client_id):
            return
        if self.conversation is None:
            # The first message starts the conversation, unless it would be refused anyway;
            # the socket joins the conversation's group before the message is saved, so it
            # hears what saving it sets off (a handoff, say).
            services.message_check(client_id=client_id, text=content["text"])
            await self._started_conversation()
        message, _created = await database_sync_to_async(services.message_create_customer)(
            conversation=self.conversation, client_id=client_id, text=content["text"]
        )
        await self._send_direct(frames.message_frame(message))
        # Also for a resend: if the first copy was saved but never answered (a crash in
        # between), this answers it; if it was answered, the runner finds nothing to do.
        self._request_reply()

    async def _on_resume(self, content: dict[str, Any]) -> None:
        if await self._rate_limited("other"):
            return
        after = content.get("after", 0)
        messages = await database_sync_to_async(services.conversation_resume)(
            conversation=self.conversation,
            after_id=after,
            owner=replies.PROCESS_ID,
            live_ids=replies.live_replies,
        )
        for message in messages:
            live = replies.live_replies.get(message.pk)
            if live is not None and message.status == Message.Status.STREAMING:
                # Text from memory, newer than the last heartbeat; later tokens continue from ``seq``.
                await self.send_json(frames.message_frame(message, body=live.text, seq=live.seq))
            else:
                await self.send_json(frames.message_frame(message))
                if message.status == Message.Status.STREAMING:
                    self._watch_stream(message)
        await self.send_json(
            {"type": "resumed", "count": len(messages), "last_id": messages[-1].pk if messages else after}
        )
        if self.conversation is not None:
            await self.send_json(frames.handoff_frame(self.conversation))
            self._request_reply()

    async def _on_typing(self, content: dict[str, Any]) -> None:
        if self.conversation is None:
            return  # nobody else watches a conversation that has not started
        now = time.monotonic()
        if now - self._last_typing < TYPING_MIN_INTERVAL_S:
            return
        self._last_typing = now
        try:
            await self.channel_layer.group_send(
                self.conversation.group_name,
                {"type": "chat.typing", "frame": frames.typing_frame(role="customer"), "origin": self.channel_name},
            )
        except Exception as exc:  # noqa: BLE001 - a lost "typing…" is no error to the customer
            log.info("Typing not relayed in conversation %s: %s", self.conversation.pk, exc)

    async def _on_request_human(self, content: dict[str, Any]) -> None:
        if await self._rate_limited("other"):
            return
        conversation = await self._started_conversation()
        await database_sync_to_async(services.conversation_request_human)(conversation=conversation)
        await self._send_direct(frames.handoff_frame(conversation))

    async def _on_csat(self, content: dict[str, Any]) -> None:
        if await self._rate_limited("other"):
            return
        message = await database_sync_to_async(services.csat_record)(
            conversation=self.conversation, message_id=content.get("message_id"), helpful=content.get("helpful")
        )
        await self._send_direct(frames.message_frame(message))

    def _request_reply(self) -> None:
        """Ask for a bot reply; whether one is due is read from the database by the runner.

        Not from ``self.conversation.status``: that is what this socket last heard, and a
        lost hand-back frame would keep the bot quiet until the customer reconnects.
        (``replies._conversation_needing_reply`` checks, ``services.bot_reply_start``
        decides under the row lock.)
        """
        if self.conversation is not None:
            replies.reply_request(
                conversation_id=str(self.conversation.pk), send=self._send_direct, origin=self.channel_name
            )

    def _watch_stream(self, message) -> None:
        """A reply streaming in no process we know of: flag it failed once its heartbeat has stopped."""

        async def recheck() -> None:
            while not self.closed:
                await asyncio.sleep(services.reply_stale_deadline(message).total_seconds() + 0.5)
                await database_sync_to_async(services.bot_replies_recover)(
                    conversation=self.conversation, owner=replies.PROCESS_ID, live_ids=replies.live_replies
                )
                await database_sync_to_async(message.refresh_from_db)(fields=["status", "generation"])
                if message.status != Message.Status.STREAMING:
                    return  # its reply_done reached the group: from its writer, or from recovery

        task = asyncio.create_task(recheck())
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    # --- frames to the client ------------------------------------------------------------

    async def _send_direct(self, frame: dict[str, Any]) -> None:
        """Send a frame this socket caused; the group's copy of it is then skipped."""
        if self.closed:
            return
        self._recent_direct.append(json.dumps(frame, sort_keys=True))
        await self.send_json(frame)

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        if not self.closed:
            await self.send_json(frames.error_frame(code, message, **extra))

    async def _relay(self, event: dict[str, Any]) -> None:
        if self.closed or event.get("origin") == self.channel_name:
            return
        frame = event["frame"]
        key = json.dumps(frame, sort_keys=True)
        if key in self._recent_direct:
            self._recent_direct.remove(key)
            return
        if frame.get("type") == "handoff":
            self.conversation.status, self.conversation.handoff_reason = frame["status"], frame["reason"]
            self.conversation.agent_display_name = frame.get("agent_name", "")
            if frame["status"] != Conversation.Status.BOT:
                # A human has it now: a reply this process is still writing stops here.
                await replies.reply_cut(str(self.conversation.pk))
        await self.send_json(frame)

    async def chat_tokens(self, event: dict[str, Any]) -> None:
        """A batch of one reply's token frames from its writer (see replies._TokenBroadcast)."""
        if self.closed or event.get("origin") == self.channel_name:
            return
        for frame in event["frames"]:
            await self._relay({"frame": frame})

    async def chat_conversation_started(self, event: dict[str, Any]) -> None:
        """Another socket of this customer started their conversation (customer group): follow it."""
        if self.closed or self.conversation is not None:
            return
        try:
            conversation = await database_sync_to_async(services.conversation_open_for_session)(
                session_key=self.session_key, user=self.user, conversation_id=event["conversation"], create=False
            )
        except ApplicationError:
            return  # not this customer's after all (a stale membership): ignore
        await self._join(conversation)

    # Channel-layer events of the conversation group (``chat.message`` -> ``chat_message``).
    # They carry ready frames, so no handler touches the ORM.
    chat_message = _relay
    chat_token = _relay  # one token per event, as processes before chat.tokens send them
    chat_reply_done = _relay
    chat_handoff = _relay
    chat_typing = _relay
