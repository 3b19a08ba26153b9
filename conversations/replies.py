"""Streaming bot replies: one runner per conversation per process, between the engine and the services.

The consumer asks for a reply with ``reply_request`` and goes on reading frames;
the runner, an asyncio task, answers the conversation's newest customer message:

1. ``bot_reply_start`` saves the reply as ``streaming`` (or says there is nothing
   to answer: handed off, already answered, another reply streaming);
2. the engine's async stream yields ``TokenDelta`` events; each becomes a ``token``
   frame, sent straight to the asking socket and, while another socket of the
   conversation watches (a second tab, an agent), copied to the conversation's group
   in batches that never hold up the stream; the engine generates in its own thread,
   never on the event loop;
3. every ``REPLY_HEARTBEAT_S`` the text so far is saved, proving the writer alive;
4. ``bot_reply_finish`` saves the final text and its provenance, then ``reply_done``.

When the reply is done the runner looks again, so messages that arrived meanwhile
are answered too, one reply at a time per conversation. The runner does not stop
when the asking socket closes: the reply is saved, and a reloaded page gets it by
``resume``. ``live_replies`` is this process's registry of replies being written,
which ``resume`` uses to send their text so far and recovery uses to tell a live
reply from a dead one.

When the conversation leaves the bot while a reply streams (an agent takes it over),
``reply_cut`` stops the engine at once; the consumer calls it when the status change
reaches the socket, and the heartbeat checks the conversation too, so a reply whose
socket has gone is stopped within ``REPLY_HEARTBEAT_S``. The cut reply is saved
``failed`` with its text so far (finish reason ``taken_over``): the bot never goes on
writing in a conversation a human has.

When the server shuts down (``conversations.lifecycle``), ``replies_stop`` lets
running replies finish within a grace period and cuts off the rest: each is saved
as ``failed`` with its text so far (finish reason ``shutdown``), and the next server
answers its question again when the customer's chat resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from finetune.serving import runtime
from finetune.serving.interface import EngineBusy, GenerationDone, GenerationParams, GenerationRequest, TokenDelta
from finetune.serving.runtime import get_engine

from . import frames, services
from .broadcast import group_has_other_members
from .models import Conversation, Message
from .selectors import (
    SHUTDOWN_FINISH_REASON,
    TAKEN_OVER_FINISH_REASON,
    conversation_language,
    replies_to,
    reply_target,
)

log = logging.getLogger(__name__)


def _pid_namespace() -> str:
    """Processes that print the same value see each other's PIDs: one boot of one kernel, one PID namespace.

    (A hostname alone is not enough: two containers may share one.) Empty where the
    system does not say (not Linux), and then no PID is ever trusted.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:12]


PID_NAMESPACE = _pid_namespace()
# Identifies this process in a streaming reply's row ("who is writing it"):
# host:pid:random[:pid-namespace], read back by ``process_gone``.
PROCESS_ID = ":".join(
    part for part in (socket.gethostname(), str(os.getpid()), uuid.uuid4().hex[:8], PID_NAMESPACE) if part
)


def process_gone(owner: str) -> bool:
    """Whether the process named by ``owner`` (a ``PROCESS_ID``) has surely ended.

    Only a process in this PID namespace can be checked; for any other (another
    machine, an older id format) the answer is False, and its reply is judged by its
    heartbeat instead. A PID taken by a new process also reads as alive: the heartbeat
    then decides. Safe to call for replies of other live servers sharing the database.
    """
    parts = owner.split(":")
    if owner == PROCESS_ID or len(parts) != 4 or not PID_NAMESPACE or parts[3] != PID_NAMESPACE:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return True  # this PID, but not this process: an earlier one that had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# Beyond the engine's own wall-clock limit: how long the runner waits for a stream
# that has gone silent (queued behind other chats, or a stuck engine) before failing it.
STREAM_GRACE_S = 30.0
# How often a streaming reply's tokens are copied to the conversation's other sockets,
# and, while it has none, how often to look whether one has come.
TOKEN_COPY_INTERVAL_S = 0.05
WATCHER_RECHECK_S = 1.0

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class LiveReply:
    message_id: int
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def seq(self) -> int:
        return len(self.parts)


live_replies: dict[int, LiveReply] = {}
_runners: dict[str, _Runner] = {}
stopping = False  # the server is shutting down: no new reply starts (the next server answers)


def generation_params() -> GenerationParams:
    """Parameters of every chat reply: the limits from settings (greedy, a few sentences)."""
    return runtime.generation_params()


class _Runner:
    def __init__(self, conversation_id: str, send: Send, origin: str):
        self.conversation_id = conversation_id
        self.group = f"conversation.{conversation_id}"
        self.send = send
        self.origin = origin
        self.wanted = True
        self.task: asyncio.Task | None = None
        # The reply being streamed: its engine and request id, so ``cut`` can stop it.
        self.streaming: tuple[Any, str] | None = None
        self.cut_reason = ""

    async def cut(self, reason: str) -> bool:
        """Stop the reply being streamed (if any); it is saved with finish reason ``reason``."""
        if self.streaming is None or self.cut_reason:
            return False
        self.cut_reason = reason
        engine, request_id = self.streaming
        await engine.cancel(request_id)
        return True

    async def run(self) -> None:
        try:
            while self.wanted and not stopping:
                self.wanted = False
                if await self._reply_once():
                    self.wanted = True  # more messages may have arrived while this one streamed
        except Exception:
            log.exception("Reply runner of conversation %s failed", self.conversation_id)
        finally:
            # No await between the last look at ``wanted`` and leaving the registry, so
            # a request that arrives now starts a new runner rather than being missed.
            if _runners.get(self.conversation_id) is self:
                del _runners[self.conversation_id]

    async def _reply_once(self) -> bool:
        """Answer the newest customer message if it needs an answer; True if a reply was written."""
        conversation = await database_sync_to_async(_conversation_needing_reply)(self.conversation_id)
        if conversation is None:
            return False
        try:
            engine = await get_engine()
        except Exception:
            log.exception("Loading the active model failed; the chat offers a human instead")
            engine = None
        if engine is None:
            notice = await database_sync_to_async(services.conversation_notice_no_model)(conversation=conversation)
            if notice is not None:
                await self.send(frames.message_frame(notice))
            return False
        params = generation_params()
        started = await database_sync_to_async(services.bot_reply_start)(
            conversation=conversation,
            model_label=engine.model_label,
            params={**dataclasses.asdict(params), "stop": list(params.stop)},
            owner=PROCESS_ID,
            live_ids=live_replies,
        )
        if started is None:
            return False
        message, prompt = started
        # The neutral words of slots nobody can fill are written in the customer's language.
        language = await database_sync_to_async(conversation_language)(
            conversation=conversation, upto=message.in_reply_to
        )
        live = LiveReply(message.pk)
        live_replies[message.pk] = live
        try:
            await self.send(frames.message_frame(message))
            await self.send(frames.typing_frame(role="bot"))
            final = await self._stream(engine, message, prompt, params, live, language)
        finally:
            live_replies.pop(message.pk, None)
        await self.send(frames.reply_done_frame(final))
        if final.status == Message.Status.FAILED and (final.generation or {}).get("finish_reason") == "error":
            # The model failed (a vLLM server died mid-reply, say): say so, not only a
            # greyed-out reply. The customer's message is saved; the chat went to a person.
            await self.send(
                frames.error_frame(
                    "reply_failed",
                    "The bot could not finish this reply. Your message is saved and a person will answer.",
                    reply_id=final.pk,
                )
            )
        return True

    async def _stream(
        self, engine, message: Message, prompt, params: GenerationParams, live: LiveReply, language: str
    ) -> Message:
        request = GenerationRequest(key=self.conversation_id, messages=prompt, params=params, language=language)
        self.streaming, self.cut_reason = (engine, request.request_id), ""
        heartbeat = asyncio.create_task(_heartbeat(live, self))
        copies = _TokenBroadcast(self.group, self.origin)
        done: GenerationDone | None = None
        error = ""
        try:
            async with asyncio.timeout(params.timeout_s + STREAM_GRACE_S):
                async for event in engine.stream(request):
                    if self.cut_reason:
                        break  # tokens the engine made before it heard the cancel are not sent
                    if isinstance(event, TokenDelta):
                        if event.text:
                            live.parts.append(event.text)
                            frame = frames.token_frame(reply_id=message.pk, delta=event.text, seq=live.seq)
                            await self.send(frame)
                            copies.add(frame)
                    else:
                        done = event
        except EngineBusy:
            error = "Another reply of this conversation is being written."
        except TimeoutError:
            await engine.cancel(request.request_id)
            error = f"The model did not finish within {params.timeout_s + STREAM_GRACE_S:.0f} s."
        except asyncio.CancelledError:
            # The process is shutting down: record the reply as cut off, tell the asking
            # socket (the connection is still open until the server closes it), then stop.
            await engine.cancel(request.request_id)
            heartbeat.cancel()
            copies.abandon()
            cut = await _save_cut_off(message.pk, live)
            if cut is not None:
                with contextlib.suppress(Exception):
                    await self.send(frames.reply_done_frame(cut))
            raise
        except Exception as exc:
            log.exception("Streaming reply %s failed", message.pk)
            error = f"The model failed: {type(exc).__name__}."
        finally:
            heartbeat.cancel()
            self.streaming = None
        # The group hears every token before it hears the saved reply.
        await copies.drain()
        if self.cut_reason:
            done = GenerationDone(
                text=live.text,
                finish_reason=self.cut_reason,
                token_count=live.seq,
                mean_logprob=None,
                model_label=engine.model_label,
                first_token_ms=None,
                latency_ms=0,
                error=CUT_ERRORS[self.cut_reason],
            )
        if done is not None:
            return await database_sync_to_async(services.bot_reply_finish)(
                message_id=message.pk, done=done, seq=live.seq
            )
        return await database_sync_to_async(services.bot_reply_fail)(
            message_id=message.pk, error=error or "The model stream ended early.", body=live.text, seq=live.seq
        )


class _TokenBroadcast:
    """Copies one reply's token frames to the conversation's other sockets (a second tab, an agent).

    The asking socket gets each token straight away; the copies go out from a task of
    their own, so a slow channel layer never holds up the stream.

    - Only while someone else watches: most conversations have one socket, which would
      receive every copy just to discard it (on Redis, several round trips per word).
      The group's members are looked up at the first token and, while nobody else is
      there, again every ``WATCHER_RECHECK_S`` and at the end. Frames are kept until
      then, so a socket that joins mid-reply gets them all (it skips the ``seq``s it
      already holds from ``resume``).
    - Batched: the first copy leaves at once, later ones at most every
      ``TOKEN_COPY_INTERVAL_S``, all that piled up in one ``chat.tokens`` event, whose
      consumers send the frames on one by one (the browser sees the same frames).
    """

    def __init__(self, group: str, origin: str, interval: float | None = None, recheck: float | None = None):
        self.group = group
        self.origin = origin
        self.interval = TOKEN_COPY_INTERVAL_S if interval is None else interval
        self.recheck = WATCHER_RECHECK_S if recheck is None else recheck
        self.pending: list[dict[str, Any]] = []
        self.task: asyncio.Task | None = None
        self.hurry = asyncio.Event()  # set by drain: send what is left without waiting
        self.watched = False  # once someone else watches, copies go on to the end
        self.checked_at: float | None = None
        self.failed = False  # a copy could not be sent: the others get the saved reply instead

    def add(self, frame: dict[str, Any]) -> None:
        if self.failed:
            return
        self.pending.append(frame)
        # The sender leaves its loop only with nothing pending, and nothing can be added
        # between its last look and its end (no await there), so no frame is stranded.
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._send_pending())

    async def _send_pending(self) -> None:
        layer = get_channel_layer()
        loop = asyncio.get_running_loop()
        while self.pending:
            started = loop.time()
            if await self._is_watched(layer, started):
                batch, self.pending = self.pending, []
                try:
                    await layer.group_send(self.group, {"type": "chat.tokens", "frames": batch, "origin": self.origin})
                except Exception as exc:  # noqa: BLE001 - other watchers get the text from reply_done
                    # Once per reply (say Redis is down): the rest of this reply's copies are dropped.
                    log.warning("Copying tokens to %s failed (%s); no more copies of this reply", self.group, exc)
                    self.pending, self.failed = [], True
                    return
                pause = self.interval - (loop.time() - started)
            elif self.hurry.is_set():
                self.pending = []  # the reply is done and nobody else watched it
                return
            else:
                pause = self.checked_at + self.recheck - loop.time()
            if pause > 0 and not self.hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.hurry.wait(), pause)

    async def _is_watched(self, layer, now: float) -> bool:
        if self.watched:
            return True
        if self.checked_at is not None and now - self.checked_at < self.recheck and not self.hurry.is_set():
            return False
        self.checked_at = now
        self.watched = await group_has_other_members(layer, self.group, self.origin)
        return self.watched

    async def drain(self, timeout: float = 10.0) -> None:
        """Send what is left now and wait for it (at most ``timeout``: the saved reply repairs a gap)."""
        self.hurry.set()
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            log.warning("Token copies to %s still unsent after %.0f s; dropped", self.group, timeout)
            self.abandon()

    def abandon(self) -> None:
        self.pending = []
        if self.task is not None:
            self.task.cancel()


def _conversation_needing_reply(conversation_id: str) -> Conversation | None:
    """Cheap check before loading the engine; ``bot_reply_start`` decides again under a lock."""
    conversation = Conversation.objects.filter(pk=conversation_id, status=Conversation.Status.BOT).first()
    if conversation is None:
        return None
    target = reply_target(conversation=conversation)
    if target is None or replies_to(target).exists():
        return None
    return conversation


async def _heartbeat(live: LiveReply, runner: _Runner) -> None:
    while True:
        await asyncio.sleep(services.REPLY_HEARTBEAT_S)
        try:
            still_bots = await database_sync_to_async(services.bot_reply_heartbeat)(
                message_id=live.message_id, body=live.text, seq=live.seq
            )
        except Exception:  # noqa: BLE001 - a missed heartbeat only risks an early "failed" flag
            log.warning("Heartbeat of reply %s failed", live.message_id, exc_info=True)
            continue
        if not still_bots:
            # Taken over (or closed) while nobody here heard the status change: stop writing.
            await runner.cut(TAKEN_OVER_FINISH_REASON)
            return


CUT_ERRORS = {TAKEN_OVER_FINISH_REASON: "An agent took the conversation over; the bot stopped writing."}


async def reply_cut(conversation_id: str, reason: str = TAKEN_OVER_FINISH_REASON) -> bool:
    """Stop this process's reply streaming in the conversation, if any (an agent took it over).

    The reply is saved ``failed`` with its text so far and finish reason ``reason``;
    True if a reply was stopped.
    """
    runner = _runners.get(conversation_id)
    return runner is not None and await runner.cut(reason)


async def _save_cut_off(message_id: int, live: LiveReply) -> Message | None:
    try:
        return await database_sync_to_async(services.bot_reply_finish)(
            message_id=message_id,
            done=GenerationDone(
                text=live.text,
                finish_reason=SHUTDOWN_FINISH_REASON,
                token_count=live.seq,
                mean_logprob=None,
                model_label="",
                first_token_ms=None,
                latency_ms=0,
                error="The server stopped while writing this reply.",
            ),
            seq=live.seq,
        )
    except Exception:  # noqa: BLE001 - recovery marks it failed from the stopped heartbeat
        log.warning("Could not record reply %s as cut off", message_id, exc_info=True)
        return None


def reply_request(*, conversation_id: str, send: Send, origin: str) -> asyncio.Task | None:
    """Make sure this process answers the conversation's unanswered message (if any).

    None while the server shuts down: the message is saved, and the next server
    answers it when the customer's chat resumes.

    ``send`` delivers frames straight to the asking socket; ``origin`` is its channel
    name, so its consumer skips the group's copies of the token frames.
    """
    runner = _runners.get(conversation_id)
    if runner is not None and runner.task is not None and not runner.task.done():
        runner.wanted = True
        return runner.task
    if stopping:
        return None
    runner = _Runner(conversation_id, send, origin)
    _runners[conversation_id] = runner
    runner.task = asyncio.create_task(runner.run(), name=f"reply-{conversation_id}")
    return runner.task


async def replies_wait(timeout: float = 30.0) -> None:
    """Wait for every reply runner of this process to finish (tests, shutdown)."""
    tasks = [r.task for r in list(_runners.values()) if r.task is not None]
    if tasks:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)


async def replies_stop(grace_s: float) -> tuple[int, int]:
    """Shutdown: start no new reply, let running ones finish within ``grace_s``, cut off the rest.

    A cut-off reply is saved ``failed`` with its text so far (finish reason
    ``shutdown``) and its ``reply_done`` sent to the asking socket. Returns how many
    replies finished and how many were cut off.
    """
    global stopping
    stopping = True
    tasks = [r.task for r in list(_runners.values()) if r.task is not None and not r.task.done()]
    if not tasks:
        return 0, 0
    _done, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    if pending:
        # Each cut-off reply is saved from its own task, which ends once it is.
        await asyncio.wait(pending, timeout=10)
    return len(tasks) - len(pending), len(pending)
