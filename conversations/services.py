"""The rules of a live chat: who may open a conversation, saving messages, bot replies, handoff.

Every write of the chat goes through here; the customer's consumer and the agents'
workspace only parse input and call these. Each service that changes rows is
atomic, and tells the conversation's channel-layer group after commit (see
``broadcast.py``): the database is the truth, broadcasts are a courtesy that
``resume`` repairs.

A bot reply's life: ``bot_reply_start`` saves it as ``streaming``;
``bot_reply_heartbeat`` saves the text so far every few seconds while tokens
stream; ``bot_reply_finish`` saves the final text, model version, parameters,
latency and token count as ``complete`` (or ``failed``). A reply whose process
died stays ``streaming`` only until ``bot_replies_recover`` sees its heartbeat
stop and marks it ``failed``: never half-written without a flag.

Agents in a conversation (the end of this module): ``conversation_take_over`` gives
it to one agent and the bot stops answering (``bot_reply_start`` answers only a
conversation in status ``bot``); ``message_create_agent`` is the agent writing;
``conversation_hand_back`` returns it to the bot; ``conversation_close`` ends it.
The customer's sockets hear each change at once (``chat.handoff``, ``chat.message``).
Review queues, claims and reviews are in ``review/services.py``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
import uuid
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from finetune.serving.interface import GenerationDone
from supportbot.errors import ApplicationError

from . import frames
from .broadcast import AGENTS_GROUP, group_send_on_commit
from .models import Conversation, Message
from .monitoring import services as monitoring_services
from .review import services as review_services
from .review.selectors import display_name, reply_intent
from .selectors import (
    SHUTDOWN_FINISH_REASON,
    TAKEN_OVER_FINISH_REASON,
    messages_after,
    model_version_for_label,
    prompt_messages,
    replies_to,
    reply_target,
)

# A streaming reply's text and heartbeat are saved this often...
log = logging.getLogger(__name__)

REPLY_HEARTBEAT_S = 5.0
# ...so one whose heartbeat is older than this has no process writing it any more.
REPLY_STALE_AFTER_S = 20.0
# A reply of this process is registered as live just after ``bot_reply_start`` commits;
# recovery leaves this process's replies younger than this alone to cover that moment.
REPLY_REGISTER_GRACE_S = 2.0
CLIENT_ID_MAX = 64  # Message.client_id's max_length

NOTICE_NO_MODEL = (
    "Our assistant is not available yet, so it cannot answer. "
    "Press “Talk to a human” and a support agent will reply here."
)
HANDOFF_NOTICES = {
    Conversation.HandoffReason.CUSTOMER_REQUEST: "You asked for a person. A support agent will join this chat.",
    Conversation.HandoffReason.KEYWORD: "It sounds like you want a person. A support agent will join this chat.",
    Conversation.HandoffReason.LOW_CONFIDENCE: "The assistant is not sure about this one, so a support agent "
    "will join this chat.",
    Conversation.HandoffReason.ERROR: "The assistant could not answer, so a support agent will join this chat.",
    Conversation.HandoffReason.NO_MODEL: "A support agent will join this chat.",
}
HANDOFF_NOTICE_TAIL = " Everything you write here is kept for them."


# --- conversations -------------------------------------------------------------------


def conversation_is_owner(*, conversation: Conversation, session_key: str, user=None) -> bool:
    """A conversation of a signed-in customer is theirs; an anonymous one belongs to its session."""
    if conversation.customer_id is not None:
        return bool(user is not None and user.is_authenticated and user.pk == conversation.customer_id)
    return bool(session_key) and conversation.session_key == session_key


def customer_group_name(*, session_key: str, user=None) -> str:
    """Channel-layer group of every socket of one customer (signed-in user, else session).

    Sockets opened before the customer's first message have no conversation yet; this
    group tells them when one starts (``chat.conversation_started``). The key is hashed:
    a session key is a secret, and group names end up in Redis keys and logs.
    """
    who = f"user:{user.pk}" if user is not None and user.is_authenticated else f"session:{session_key}"
    return "customer." + hashlib.sha256(who.encode()).hexdigest()[:40]


def conversation_open_for_session(
    *,
    session_key: str,
    user=None,
    conversation_id: uuid.UUID | str | None = None,
    segment: str = "",
    metadata: dict[str, Any] | None = None,
    create: bool = True,
) -> Conversation | None:
    """The conversation a socket opens: the one asked for, or the customer's open one.

    Without an open one, a new one is created, or, with ``create=False`` (a socket
    opening: a conversation starts at the customer's first message, so agents never
    see empty ones), None is returned. A new conversation is announced to the
    customer's other sockets (``customer_group_name``) after commit.

    Raises ``ApplicationError`` with code ``no_session`` without an identity, and
    ``forbidden`` for a conversation that is not the customer's (or does not exist:
    both look the same, so ids cannot be probed).
    """
    signed_in = user is not None and user.is_authenticated
    if not session_key and not signed_in:
        raise ApplicationError(
            "This chat has no session. Load the chat page (or the page with the widget) again.", code="no_session"
        )
    if conversation_id is not None:
        conversation = Conversation.objects.filter(pk=conversation_id).first()
        if conversation is None or not conversation_is_owner(
            conversation=conversation, session_key=session_key, user=user
        ):
            raise ApplicationError("This conversation belongs to someone else.", code="forbidden")
        return conversation
    open_ones = Conversation.objects.exclude(status=Conversation.Status.CLOSED)
    if signed_in:
        open_ones = open_ones.filter(customer=user)
    else:
        open_ones = open_ones.filter(session_key=session_key, customer__isnull=True)
    conversation = open_ones.order_by("-started_at").first()
    if conversation is not None or not create:
        return conversation
    try:
        # A savepoint: losing the race must not break a surrounding transaction.
        with transaction.atomic():
            conversation = Conversation.objects.create(
                session_key=session_key or "",
                customer=user if signed_in else None,
                segment=(segment or "")[:64],
                metadata=metadata or {},
            )
            group_send_on_commit(
                customer_group_name(session_key=session_key, user=user),
                {"type": "chat.conversation_started", "conversation": str(conversation.pk)},
            )
            return conversation
    except IntegrityError:
        # Another socket of the same customer created it a moment ago: join that one.
        conversation = open_ones.order_by("-started_at").first()
        if conversation is None:
            raise
        return conversation


def handoff_keyword_in(text: str) -> bool:
    """Whether the customer wrote one of the words that ask for a person (whole words, plurals too)."""
    words = [w.strip() for w in settings.SUPPORTBOT_HANDOFF_KEYWORDS if w.strip()]
    if not words:
        return False
    pattern = r"\b(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in words) + r")s?\b"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def _system_message(conversation: Conversation, body: str, *, kind: str) -> Message:
    message = Message.objects.create(
        conversation=conversation, role=Message.Role.SYSTEM, body=body, generation={"notice": kind}
    )
    group_send_on_commit(conversation.group_name, {"type": "chat.message", "frame": frames.message_frame(message)})
    return message


@transaction.atomic
def conversation_handoff(*, conversation: Conversation, reason: str) -> bool:
    """Move a bot conversation to ``waiting_for_agent``; the bot stops answering and agents are told.

    Returns False when the conversation is not the bot's any more (already waiting,
    with an agent or closed): asking twice changes nothing. Updates ``conversation``
    in place.
    """
    locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if locked.status != Conversation.Status.BOT:
        conversation.status, conversation.handoff_reason = locked.status, locked.handoff_reason
        return False
    conversation.status = Conversation.Status.WAITING_FOR_AGENT
    conversation.handoff_reason = reason
    conversation.save(update_fields=["status", "handoff_reason"])
    _system_message(
        conversation, HANDOFF_NOTICES.get(reason, HANDOFF_NOTICES["no_model"]) + HANDOFF_NOTICE_TAIL, kind="handoff"
    )
    group_send_on_commit(conversation.group_name, {"type": "chat.handoff", "frame": frames.handoff_frame(conversation)})
    # The agents' workspace: a notice, an entry in the handoff queue, every header's new count.
    group_send_on_commit(
        AGENTS_GROUP,
        {"type": "agents.handoff", "conversation": str(conversation.pk), "reason": reason},
    )
    review_services.queue_item_add_handoff(conversation=conversation, reason=reason)
    review_services.waiting_count_announce()
    monitoring_services.reply_outcome_after_handoff(conversation=conversation)
    return True


def conversation_request_human(*, conversation: Conversation) -> bool:
    """The customer pressed "Talk to a human"."""
    return conversation_handoff(conversation=conversation, reason=Conversation.HandoffReason.CUSTOMER_REQUEST)


# --- customer messages ----------------------------------------------------------------


def _client_id_check(client_id: Any, text: Any) -> None:
    if not isinstance(client_id, str) or not client_id.strip() or len(client_id) > CLIENT_ID_MAX:
        raise ApplicationError(
            f"client_id must be a non-empty string of at most {CLIENT_ID_MAX} characters, unique per message "
            "(a UUID); it lets a resend be recognised.",
            code="bad_frame",
        )
    if not isinstance(text, str):
        raise ApplicationError("text must be a string.", code="bad_frame", extra={"client_id": client_id})


# Characters that show nothing on their own: controls, format characters (zero-width
# space and joiners, byte-order mark, bidi controls, soft hyphen, tags), separators, and
# these blank-looking letters and marks (Unicode's Default_Ignorable_Code_Point, which
# unicodedata does not expose, plus the Braille blank).
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zs", "Zl", "Zp"}
_INVISIBLE_CHARS = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def _invisible(char: str) -> bool:
    return char in _INVISIBLE_CHARS or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def message_text_normalize(text: str) -> str:
    """The form a message is saved in: NFC (one code point per accented letter), without invisible edges.

    Invisible characters inside the text stay (the joiners of an emoji sequence).
    """
    text = unicodedata.normalize("NFC", text)
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    return text[start:end]


def _message_body(*, client_id: str, text: str) -> str:
    """The text to save, or ``ApplicationError`` (``empty``: nothing visible; ``too_long``)."""
    body = message_text_normalize(text)
    limit = settings.SUPPORTBOT_MAX_MESSAGE_CHARS
    if not body:  # its edges are trimmed, so nothing visible is left
        raise ApplicationError("The message is empty; type a question.", code="empty", extra={"client_id": client_id})
    if len(body) > limit:
        raise ApplicationError(
            f"The message is {len(body)} characters long; the limit is {limit}. Shorten it or split it up.",
            code="too_long",
            extra={"client_id": client_id, "limit": limit},
        )
    return body


def message_check(*, client_id: Any, text: Any) -> None:
    """Refuse a customer message ``message_create_customer`` would refuse whatever the conversation.

    A socket with no conversation yet asks this before starting one, so a refused first
    message starts nothing.
    """
    _client_id_check(client_id, text)
    _message_body(client_id=client_id, text=text)


def message_create_customer(*, conversation: Conversation, client_id: str, text: str) -> tuple[Message, bool]:
    """Save a customer's message before anything else happens to it.

    Idempotent on ``client_id``: a resend (same id, e.g. after a reconnect) returns
    the saved message and ``created=False``, and is not answered again. A new
    message with a handoff keyword also hands the conversation to a human
    (``conversation.status`` shows it).
    """
    _client_id_check(client_id, text)
    existing = conversation.messages.filter(client_id=client_id).first()
    if existing is not None:
        return existing, False
    body = _message_body(client_id=client_id, text=text)
    # Labelled before the transaction: the detector takes about a millisecond, no lock needed.
    labels = monitoring_services.message_segments_label(body)
    try:
        with transaction.atomic():
            # The row's status, not the caller's copy: an agent may have closed it since
            # the socket opened. The lock keeps a close from slipping in before the insert.
            status = Conversation.objects.select_for_update().values_list("status", flat=True).get(pk=conversation.pk)
            conversation.status = status
            if status == Conversation.Status.CLOSED:
                raise ApplicationError(
                    "This conversation has been closed, so your message was not sent. Reload the page to start "
                    "a new conversation, and send it there.",
                    code="conversation_closed",
                    extra={"client_id": client_id},
                )
            message = Message.objects.create(
                conversation=conversation, role=Message.Role.CUSTOMER, body=body, client_id=client_id, **labels
            )
            Conversation.objects.filter(pk=conversation.pk).update(last_message_at=message.created_at)
            group_send_on_commit(
                conversation.group_name, {"type": "chat.message", "frame": frames.message_frame(message)}
            )
    except IntegrityError:
        # The same message arrived on another socket at the same moment.
        return conversation.messages.get(client_id=client_id), False
    if conversation.status == Conversation.Status.BOT and handoff_keyword_in(body):
        conversation_handoff(conversation=conversation, reason=Conversation.HandoffReason.KEYWORD)
    return message, True


def conversation_notice_no_model(*, conversation: Conversation) -> Message | None:
    """Tell the customer no model can answer yet, once per unanswered stretch."""
    last = conversation.messages.exclude(role=Message.Role.CUSTOMER).order_by("-pk").first()
    if last is not None and (last.generation or {}).get("notice") == "no_model":
        return None
    with transaction.atomic():
        return _system_message(conversation, NOTICE_NO_MODEL, kind="no_model")


@transaction.atomic
def csat_record(*, conversation: Conversation | None, message_id: int, helpful: bool) -> Message:
    """The customer's answer to "Was this helpful?" on a bot reply (a later answer replaces it)."""
    if not isinstance(helpful, bool):
        raise ApplicationError("helpful must be true or false.", code="bad_frame")
    message = (
        conversation.messages.select_for_update()
        .filter(pk=message_id, role=Message.Role.BOT, status=Message.Status.COMPLETE)
        .first()
        if isinstance(message_id, int) and conversation is not None
        else None
    )
    if message is None:
        raise ApplicationError(
            f"There is no finished bot reply with id {message_id!r} in this conversation.", code="not_found"
        )
    message.helpful = helpful
    message.helpful_at = timezone.now()
    message.save(update_fields=["helpful", "helpful_at"])
    if not helpful:
        review_services.queue_item_add(message=message, source="not_helpful")
    monitoring_services.reply_outcome_refresh(message_id=message.pk)
    group_send_on_commit(conversation.group_name, {"type": "chat.message", "frame": frames.message_frame(message)})
    return message


# --- bot replies ------------------------------------------------------------------------


def _heartbeat_age_s(message: Message, now: datetime) -> float:
    stamp = (message.generation or {}).get("heartbeat")
    try:
        beat = datetime.fromisoformat(stamp) if stamp else message.created_at
    except (TypeError, ValueError):
        beat = message.created_at
    return (now - beat).total_seconds()


def bot_replies_recover(
    *,
    conversation: Conversation,
    owner: str,
    live_ids: Collection[int],
    owner_gone: Callable[[str], bool] | None = None,
) -> list[Message]:
    """Mark ``failed`` the streaming replies of the conversation that no process is writing any more.

    A reply is dead when this process (``owner``) started it but no longer runs it
    (not in ``live_ids``, a live view such as ``replies.live_replies``, and older than
    ``REPLY_REGISTER_GRACE_S``); when ``owner_gone`` says its writer's process has
    ended (``replies.process_gone``); or when its heartbeat is older than
    ``REPLY_STALE_AFTER_S`` (its process crashed, wherever it ran).
    The text saved so far is kept. The customer's question is then handed to a human.
    """
    now = timezone.now()
    failed = []
    with transaction.atomic():
        streaming = conversation.messages.select_for_update().filter(
            role=Message.Role.BOT, status=Message.Status.STREAMING
        )
        for message in streaming:
            age = _heartbeat_age_s(message, now)
            writer = str((message.generation or {}).get("owner") or "")
            if writer == owner:
                if message.pk in live_ids or age < REPLY_REGISTER_GRACE_S:
                    continue
            elif age < REPLY_STALE_AFTER_S and not (owner_gone is not None and owner_gone(writer)):
                continue
            _reply_close(
                message,
                status=Message.Status.FAILED,
                generation={"finish_reason": "interrupted", "error": "The server stopped while writing this reply."},
            )
            failed.append(message)
        if failed and conversation.status == Conversation.Status.BOT:
            conversation_handoff(conversation=conversation, reason=Conversation.HandoffReason.ERROR)
    return failed


def bot_replies_sweep(
    *, owner: str, owner_gone: Callable[[str], bool], live_ids: Collection[int] = ()
) -> list[Message]:
    """At a server's start: mark ``failed`` every streaming reply whose writer is gone, in every conversation.

    Gone: its process has ended (``owner_gone``, which can only tell for processes it
    can see, e.g. on the same machine) or its heartbeat is stale. Replies of other
    live processes (several servers share the database) are left alone, and so are
    this process's own replies in ``live_ids`` (the sweep runs again while it serves).
    """
    conversations = Conversation.objects.filter(
        messages__role=Message.Role.BOT, messages__status=Message.Status.STREAMING
    ).distinct()
    failed: list[Message] = []
    for conversation in conversations:
        failed += bot_replies_recover(conversation=conversation, owner=owner, live_ids=live_ids, owner_gone=owner_gone)
    return failed


@transaction.atomic
def bot_reply_start(
    *,
    conversation: Conversation,
    model_label: str | None,
    params: dict[str, Any],
    owner: str,
    live_ids: Collection[int] = (),
) -> tuple[Message, list[dict[str, str]]] | None:
    """Save a ``streaming`` reply to the newest customer message, and return it with the model's prompt.

    Returns None when there is nothing for the bot to do: the conversation is not the
    bot's, the newest customer message already has a reply (finished, failed or
    being written; a reply cut off by a server shutdown does not count, so the next
    server answers again), or another reply of this conversation is still streaming
    (its writer answers the newest message when done). One reply at a time per
    conversation, across processes: the conversation row is locked.
    """
    locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
    conversation.status, conversation.handoff_reason = locked.status, locked.handoff_reason
    bot_replies_recover(conversation=conversation, owner=owner, live_ids=live_ids)
    if conversation.status != Conversation.Status.BOT:
        return None
    target = reply_target(conversation=conversation)
    if target is None:
        return None
    streaming = conversation.messages.filter(role=Message.Role.BOT, status=Message.Status.STREAMING)
    if replies_to(target).exists() or streaming.exists():
        return None
    message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.BOT,
        status=Message.Status.STREAMING,
        in_reply_to=target,
        model_version=model_version_for_label(model_label),
        generation={
            **params,
            "model_label": model_label,
            "owner": owner,
            "heartbeat": timezone.now().isoformat(),
            "seq": 0,
        },
    )
    group_send_on_commit(conversation.group_name, {"type": "chat.message", "frame": frames.message_frame(message)})
    group_send_on_commit(conversation.group_name, {"type": "chat.typing", "frame": frames.typing_frame(role="bot")})
    return message, prompt_messages(conversation=conversation, upto=target)


def bot_reply_heartbeat(*, message_id: int, body: str, seq: int) -> bool:
    """Save the text streamed so far and prove the writer alive.

    False if the writer should stop: the reply is no longer streaming, or its
    conversation is no longer the bot's (an agent took it over, or it was closed).
    """
    message = (
        Message.objects.filter(pk=message_id, status=Message.Status.STREAMING)
        .select_related("conversation")
        .only("generation", "conversation__status")
        .first()
    )
    if message is None:
        return False
    generation = {**(message.generation or {}), "heartbeat": timezone.now().isoformat(), "seq": seq}
    saved = Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(
        body=body, generation=generation
    )
    return bool(saved) and message.conversation.status == Conversation.Status.BOT


def _reply_close(message: Message, *, status: str, generation: dict[str, Any], **fields: Any) -> None:
    message.status = status
    message.generation = {**(message.generation or {}), **generation}
    for name, value in fields.items():
        setattr(message, name, value)
    message.save(update_fields=["status", "generation", *fields])
    Conversation.objects.filter(pk=message.conversation_id).update(last_message_at=timezone.now())
    group_send_on_commit(
        message.conversation.group_name, {"type": "chat.reply_done", "frame": frames.reply_done_frame(message)}
    )


@transaction.atomic
def bot_reply_finish(*, message_id: int, done: GenerationDone, seq: int) -> Message:
    """Save the finished reply with what produced it, or mark it failed.

    A reply is ``complete`` when the model stopped by itself or at its token limit
    and said something; an error, timeout, cancel, shutdown or empty text makes it
    ``failed``, and all but a cancel or a shutdown (the next server answers again)
    hand the customer to a human. A complete reply of the model whose mean token
    log-probability is under ``SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD``, or that the reply
    policy found unusable (``done.handoff``), is kept but also hands the conversation to a
    human; a retrieved past answer sent instead of unsure model words does not. Finishing
    a reply that recovery already marked failed (a slow writer, not a dead one) completes
    it after all.

    What the reply leaned on is kept with it for the agents: ``grounding`` (the past
    exchanges in its prompt) and, in ``generation``, its ``source`` ("model" or
    "retrieved" with ``source_origin``), the policy's reason and where a repeating reply
    was cut (``cut_reason``).
    """
    message = Message.objects.select_for_update().select_related("conversation").get(pk=message_id)
    text = done.text.strip()
    ok = done.finish_reason in ("stop", "length") and bool(text)
    _reply_close(
        message,
        status=Message.Status.COMPLETE if ok else Message.Status.FAILED,
        generation={
            "finish_reason": done.finish_reason,
            "error": done.error or ("" if ok or text else _no_text_error(done)),
            "seq": seq,
            "model_label": done.model_label or (message.generation or {}).get("model_label"),
            "source": done.source,
            "source_origin": done.source_origin,
            "cut_reason": done.cut_reason,
            **({"policy": done.policy} if done.policy else {}),
            **({"intent": done.policy["intent"]} if done.policy.get("intent") else {}),
        },
        body=text,
        grounding=list(done.grounding),
        model_version=model_version_for_label(done.model_label) or message.model_version,
        latency_ms=max(0, done.latency_ms),
        first_token_ms=done.first_token_ms,
        token_count=done.token_count,
        mean_logprob=done.mean_logprob,
    )
    conversation = message.conversation
    if ok:
        monitoring_services.reply_intent_record(message=message, intent=reply_intent(message))
        review_services.queue_items_for_finished_reply(message=message)
    # A cancel (the customer left), a shutdown (the next server answers again) or an
    # agent's takeover (a human has the conversation) is no reason to call a human.
    if not ok and done.finish_reason not in ("cancelled", SHUTDOWN_FINISH_REASON, TAKEN_OVER_FINISH_REASON):
        conversation_handoff(conversation=conversation, reason=Conversation.HandoffReason.ERROR)
    elif ok and (done.handoff or (done.source != "retrieved" and _unsure(done.mean_logprob))):
        conversation_handoff(conversation=conversation, reason=Conversation.HandoffReason.LOW_CONFIDENCE)
    if ok and done.source == "retrieved":
        log.info("Reply %s: source=retrieved origin=%s (%s)", message.pk, done.source_origin, done.policy.get("reason"))
    # The segments and outcome the monitoring dashboard counts (none for a failed reply).
    monitoring_services.reply_outcome_refresh(message_id=message.pk)
    return message


def _no_text_error(done: GenerationDone) -> str:
    """Why a finished reply has no text: the model wrote none, or the reply policy withheld it."""
    if done.handoff:
        reason = done.policy.get("reason", "the reply policy said so")
        return f"The reply was not shown and a human was called: {reason}"
    return "The model produced no text."


def _unsure(mean_logprob: float | None) -> bool:
    return mean_logprob is not None and mean_logprob < settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD


def bot_reply_fail(*, message_id: int, error: str, body: str = "", seq: int = 0) -> Message:
    """A reply that could not be generated (no engine, engine refused, stream broke)."""
    return bot_reply_finish(
        message_id=message_id,
        done=GenerationDone(
            text=body,
            finish_reason="error",
            token_count=0,
            mean_logprob=None,
            model_label=(Message.objects.get(pk=message_id).generation or {}).get("model_label") or "",
            first_token_ms=None,
            latency_ms=0,
            error=error,
        ),
        seq=seq,
    )


def reply_stale_deadline(message: Message) -> timedelta:
    """How long from now until a streaming ``message`` counts as dead if its heartbeat stops."""
    return timedelta(seconds=max(0.0, REPLY_STALE_AFTER_S - _heartbeat_age_s(message, timezone.now())))


def conversation_resume(
    *, conversation: Conversation | None, after_id: int, owner: str, live_ids: Collection[int]
) -> list[Message]:
    """Every message after ``after_id``, oldest first, once dead replies are flagged ``failed``.

    ``conversation`` is refreshed in place (a handoff may have happened meanwhile).
    """
    if isinstance(after_id, bool) or not isinstance(after_id, int) or after_id < 0:
        raise ApplicationError(
            "resume needs 'after': the id of the last message the client has (0 for all).", code="bad_frame"
        )
    if conversation is None:  # no conversation started yet: nothing to replay
        return []
    bot_replies_recover(conversation=conversation, owner=owner, live_ids=live_ids)
    conversation.refresh_from_db(fields=["status", "handoff_reason", "agent_display_name"])
    return list(messages_after(conversation=conversation, after_id=after_id))


# --- agents in the conversation -----------------------------------------------------------

AGENT_JOINED_NOTICE = "{name} from the support team joined the chat."
HANDED_BACK_NOTICE = "{name} handed the chat back to the assistant. Ask it anything, or ask for a person again."
CLOSED_NOTICE = "{name} closed this conversation. Reload the page to start a new one."


def _agent_required(agent) -> None:
    if agent is None or not agent.is_authenticated or not agent.has_perm("conversations.review_conversations"):
        raise ApplicationError("Only support agents may do this.", code="forbidden")


def _conversation_locked(conversation_id: uuid.UUID | str) -> Conversation:
    conversation = (
        Conversation.objects.select_for_update(of=("self",))
        .select_related("assigned_agent")
        .filter(pk=conversation_id)
        .first()
    )
    if conversation is None:
        raise ApplicationError("There is no such conversation.", code="not_found")
    return conversation


def _refuse_closed(conversation: Conversation, doing: str) -> None:
    if conversation.status == Conversation.Status.CLOSED:
        raise ApplicationError(
            f"This conversation is closed; it cannot be {doing}. The customer starts a new one by reloading the chat.",
            code="conversation_closed",
        )


def _refuse_other_agent(conversation: Conversation, agent) -> None:
    if (
        conversation.status == Conversation.Status.WITH_AGENT
        and conversation.assigned_agent_id is not None
        and conversation.assigned_agent_id != agent.pk
    ):
        raise ApplicationError(
            f"{conversation.agent_display_name or display_name(conversation.assigned_agent)} has this conversation.",
            code="claimed",
        )


def _status_changed(conversation: Conversation) -> None:
    group_send_on_commit(conversation.group_name, {"type": "chat.handoff", "frame": frames.handoff_frame(conversation)})


@transaction.atomic
def conversation_take_over(*, conversation_id: uuid.UUID | str, agent) -> Conversation:
    """Give the conversation to ``agent``: the bot stops answering, the customer is told who joined.

    Works on a conversation waiting for a human or one the bot is answering. Taking
    over one's own conversation again changes nothing. Refused for a closed
    conversation, one another agent has, or one whose handoff entry another agent
    holds in the queue.
    """
    _agent_required(agent)
    conversation = _conversation_locked(conversation_id)
    _refuse_closed(conversation, "taken over")
    if conversation.status == Conversation.Status.WITH_AGENT and conversation.assigned_agent_id == agent.pk:
        return conversation
    _refuse_other_agent(conversation, agent)
    review_services.handoff_claim_check(conversation=conversation, agent=agent)
    name = display_name(agent)
    if conversation.status == Conversation.Status.BOT:
        conversation.handoff_reason = Conversation.HandoffReason.AGENT_TAKEOVER
    conversation.status = Conversation.Status.WITH_AGENT
    conversation.assigned_agent = agent
    conversation.agent_display_name = name
    conversation.save(update_fields=["status", "handoff_reason", "assigned_agent", "agent_display_name"])
    _system_message(conversation, AGENT_JOINED_NOTICE.format(name=name), kind="agent_joined")
    review_services.handoff_items_resolve(conversation=conversation, agent=agent, resolution="taken_over")
    _status_changed(conversation)
    review_services.waiting_count_announce()
    return conversation


def message_create_agent(*, conversation_id: uuid.UUID | str, agent, client_id: str, text: str) -> tuple[Message, bool]:
    """The agent who has the conversation writes to the customer; idempotent on ``client_id`` like the customer's.

    Refused unless the conversation is with this agent (take it over first).
    """
    _agent_required(agent)
    if not isinstance(client_id, str) or not client_id.strip() or len(client_id) > CLIENT_ID_MAX:
        raise ApplicationError(
            f"client_id must be a non-empty string of at most {CLIENT_ID_MAX} characters, unique per message.",
            code="bad_frame",
        )
    if not isinstance(text, str):
        raise ApplicationError("text must be a string.", code="bad_frame", extra={"client_id": client_id})
    with transaction.atomic():
        conversation = _conversation_locked(conversation_id)
        existing = conversation.messages.filter(client_id=client_id).first()
        if existing is not None:
            return existing, False
        body = text.strip()
        limit = settings.SUPPORTBOT_MAX_MESSAGE_CHARS
        if not body:
            raise ApplicationError("The message is empty.", code="empty", extra={"client_id": client_id})
        if len(body) > limit:
            raise ApplicationError(
                f"The message is {len(body)} characters long; the limit is {limit}.",
                code="too_long",
                extra={"client_id": client_id, "limit": limit},
            )
        _refuse_closed(conversation, "written to")
        _refuse_other_agent(conversation, agent)
        if conversation.status != Conversation.Status.WITH_AGENT:
            raise ApplicationError(
                "Take the conversation over before writing to the customer.",
                code="not_taken_over",
                extra={"client_id": client_id},
            )
        message = Message.objects.create(
            conversation=conversation,
            role=Message.Role.AGENT,
            body=body,
            client_id=client_id,
            author=agent,
            generation={"author_name": conversation.agent_display_name or display_name(agent)},
        )
        Conversation.objects.filter(pk=conversation.pk).update(last_message_at=message.created_at)
        group_send_on_commit(conversation.group_name, {"type": "chat.message", "frame": frames.message_frame(message)})
    return message, True


@transaction.atomic
def conversation_hand_back(*, conversation_id: uuid.UUID | str, agent) -> Conversation:
    """The agent gives the conversation back to the bot, which answers the customer's next message."""
    _agent_required(agent)
    conversation = _conversation_locked(conversation_id)
    _refuse_closed(conversation, "handed back")
    if conversation.status != Conversation.Status.WITH_AGENT:
        raise ApplicationError("Only a conversation an agent has can be handed back to the bot.", code="not_taken_over")
    if conversation.assigned_agent_id != agent.pk and not agent.is_superuser:
        _refuse_other_agent(conversation, agent)
    name = conversation.agent_display_name or display_name(agent)
    conversation.status = Conversation.Status.BOT
    conversation.handoff_reason = Conversation.HandoffReason.NONE
    conversation.assigned_agent = None
    conversation.agent_display_name = ""
    conversation.save(update_fields=["status", "handoff_reason", "assigned_agent", "agent_display_name"])
    _system_message(conversation, HANDED_BACK_NOTICE.format(name=name), kind="handed_back")
    _status_changed(conversation)
    return conversation


@transaction.atomic
def conversation_close(*, conversation_id: uuid.UUID | str, agent) -> Conversation:
    """End the conversation: nobody answers it any more, the customer is told, its handoff entry is closed."""
    _agent_required(agent)
    conversation = _conversation_locked(conversation_id)
    _refuse_closed(conversation, "closed again")
    if not agent.is_superuser:
        _refuse_other_agent(conversation, agent)
    name = display_name(agent)
    was_waiting = conversation.status == Conversation.Status.WAITING_FOR_AGENT
    conversation.status = Conversation.Status.CLOSED
    conversation.ended_at = timezone.now()
    conversation.save(update_fields=["status", "ended_at"])
    _system_message(conversation, CLOSED_NOTICE.format(name=name), kind="closed")
    review_services.handoff_items_resolve(conversation=conversation, agent=agent, resolution="closed")
    _status_changed(conversation)
    if was_waiting:
        review_services.waiting_count_announce()
    return conversation
