"""The chat socket end to end in-process: WebsocketCommunicator on the real ASGI stack and engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from conversations import replies
from conversations.models import Conversation, Message
from conversations.tokens import chat_token_read
from finetune.serving.runtime import model_listener_stop
from tests.conversations.conftest import communicator, new_session_key, open_chat, receive_until, token_for
from tests.factories import ConversationFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _stop_model_listener():
    """The engine's model listener lives on this test's event loop; stop it with the loop.

    Left running, it would hold the Redis channel layer's receive lock into the next
    test's loop (a daphne process has one loop for its life, so this is tests only).
    """
    yield
    await model_listener_stop()


def is_done(frame: dict) -> bool:
    return frame["type"] == "reply_done"


async def ask(comm, text: str, client_id: str) -> list[dict]:
    await comm.send_json_to({"type": "message", "client_id": client_id, "text": text})
    return await receive_until(comm, is_done)


@pytest.fixture
async def token(transactional_db) -> str:
    return token_for(await database_sync_to_async(new_session_key)())


async def test_a_question_is_saved_then_answered_token_by_token(token, active_model):
    comm, hello = await open_chat(token)
    assert hello["bot_available"] is True
    assert hello["status"] == "bot"
    frames = await ask(comm, "Where is my order?", "c-1")
    # The first message starts the conversation: the socket is told which one, then the ack.
    started, ack = frames[0], frames[1]
    assert started["type"] == "conversation"
    assert started["id"] == str(await database_sync_to_async(lambda: Conversation.objects.get().pk)())
    assert (ack["type"], ack["role"], ack["client_id"]) == ("message", "customer", "c-1")
    assert ack["body"] == "Where is my order?"
    started = next(f for f in frames if f["type"] == "message" and f["role"] == "bot")
    assert started["status"] == "streaming"
    assert started["in_reply_to"] == ack["id"]
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) >= 2
    assert [t["seq"] for t in tokens] == list(range(1, len(tokens) + 1))
    done = frames[-1]
    assert done["id"] == started["id"]
    assert done["status"] == "complete"
    assert done["model_version"] == active_model.label
    assert "".join(t["delta"] for t in tokens).strip() == done["body"]
    # Saved with its provenance.
    reply = await database_sync_to_async(Message.objects.get)(pk=done["id"])
    assert reply.body == done["body"]
    assert reply.model_version_id == active_model.pk
    assert reply.token_count > 0
    assert reply.latency_ms is not None
    assert reply.mean_logprob is not None
    assert reply.generation["max_new_tokens"] > 0
    await comm.disconnect()


async def test_a_resent_message_gets_the_same_id_and_one_answer(token, active_model):
    comm, _ = await open_chat(token)
    frames = await ask(comm, "Where is my order?", "c-1")
    first_id = next(f["id"] for f in frames if f.get("client_id") == "c-1")
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "Where is my order?"})
    again = await comm.receive_json_from(timeout=5)
    assert (again["type"], again["id"]) == ("message", first_id)
    assert await comm.receive_nothing(timeout=1.0)  # no second answer
    conversation = await database_sync_to_async(Conversation.objects.get)()
    counts = await database_sync_to_async(
        lambda: (
            conversation.messages.filter(role="customer").count(),
            conversation.messages.filter(role="bot").count(),
        )
    )()
    assert counts == (1, 1)
    await comm.disconnect()


async def test_resume_after_a_disconnect_replays_what_was_missed(token, active_model):
    comm, hello = await open_chat(token)
    assert hello["id"] is None  # nothing started yet
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "Where is my order?"})
    started, ack = await receive_until(comm, lambda f: f.get("client_id") == "c-1")
    await comm.disconnect()  # gone before the reply: it is still written and saved
    await replies.replies_wait()
    comm, hello_again = await open_chat(token)
    assert hello_again["id"] == started["id"]
    await comm.send_json_to({"type": "resume", "after": 0})
    frames = await receive_until(comm, lambda f: f["type"] == "resumed")
    replayed = [f for f in frames if f["type"] == "message"]
    assert [(f["role"], f["status"]) for f in replayed] == [("customer", "complete"), ("bot", "complete")]
    assert replayed[0]["id"] == ack["id"]
    assert replayed[1]["body"]
    # Only what comes after the given id.
    await comm.send_json_to({"type": "resume", "after": ack["id"]})
    frames = await receive_until(comm, lambda f: f["type"] == "resumed")
    assert [f["id"] for f in frames if f["type"] == "message"] == [replayed[1]["id"]]
    await comm.disconnect()


async def test_a_second_socket_of_the_customer_sees_the_stream(token, active_model):
    first, _ = await open_chat(token)
    await ask(first, "Where is my order?", "c-0")  # the conversation starts
    second, _ = await open_chat(token)
    await first.send_json_to({"type": "message", "client_id": "c-1", "text": "Hello"})
    seen = await receive_until(second, is_done)
    assert [f["type"] for f in seen][:1] == ["message"]
    tokens = [f for f in seen if f["type"] == "token"]
    assert tokens
    # Every token, in order, once: the batched group copies add up to the saved reply.
    assert [f["seq"] for f in tokens] == list(range(1, len(tokens) + 1))
    assert "".join(f["delta"] for f in tokens).strip() == seen[-1]["body"]  # the saved reply is trimmed
    await receive_until(first, is_done)
    await first.disconnect()
    await second.disconnect()


async def test_a_foreign_origin_is_refused(token):
    comm = communicator(token, origin="https://evil.example")
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    good = communicator(token)
    assert (await good.connect(timeout=5))[0]
    await good.disconnect()


async def test_another_sessions_conversation_is_closed_with_4403(token):
    theirs = await database_sync_to_async(ConversationFactory)(session_key="someone-else" + "x" * 20)
    comm = communicator(token, path=f"/ws/chat/{theirs.pk}/")
    connected, _ = await comm.connect(timeout=5)
    assert connected
    error = await comm.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == "forbidden"
    closed = await comm.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4403}
    # The owner's own token opens it.
    owner = communicator(token_for(theirs.session_key), path=f"/ws/chat/{theirs.pk}/")
    assert (await owner.connect(timeout=5))[0]
    assert (await owner.receive_json_from(timeout=5))["id"] == str(theirs.pk)
    await owner.disconnect()


async def test_no_or_a_forged_token_is_closed_with_4401(transactional_db):
    for token in (None, "forged:token"):
        comm = communicator(token)
        assert (await comm.connect(timeout=5))[0]
        error = await comm.receive_json_from(timeout=5)
        assert error["type"] == "error"
        assert error["code"] in {"no_session", "session_expired"}
        assert (await comm.receive_output(timeout=5))["code"] == 4401
        await comm.disconnect()  # what the browser sends after the close; the consumer then ends


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"text": "no type"}', "bad_frame"),
        ('{"type": "message", "text": "no client id"}', "bad_frame"),
        ('{"type": "message", "client_id": "c", "text": 5}', "bad_frame"),
        ('{"type": "resume", "after": "x"}', "bad_frame"),
        ('{"type": "csat", "message_id": 99999, "helpful": true}', "not_found"),
        ('{"type": "dance"}', "unknown_type"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_open(token, no_model, raw, code):
    comm, _ = await open_chat(token)
    await comm.send_to(text_data=raw)
    error = await comm.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    await comm.send_json_to({"type": "resume", "after": 0})
    assert (await receive_until(comm, lambda f: f["type"] == "resumed"))[-1]["count"] == 0
    await comm.disconnect()


async def test_an_oversize_message_is_refused_and_the_socket_stays_open(token, no_model):
    comm, _ = await open_chat(token)
    await comm.send_json_to({"type": "message", "client_id": "big", "text": "x" * 4097})
    error = await comm.receive_json_from(timeout=5)
    assert (error["code"], error["client_id"], error["limit"]) == ("too_long", "big", 4096)
    await comm.send_json_to({"type": "message", "client_id": "ok", "text": "x" * 4096})
    ack = (await receive_until(comm, lambda f: f["type"] == "message"))[-1]
    assert ack["client_id"] == "ok"
    await comm.disconnect()


async def test_the_rate_limit_is_shared_by_the_sessions_sockets(token, no_model, settings):
    settings.SUPPORTBOT_RATE_LIMIT = 3
    first, _ = await open_chat(token)
    second, _ = await open_chat(token)
    for i, comm in enumerate([first, second, first]):
        await comm.send_json_to({"type": "message", "client_id": f"c{i}", "text": f"question {i}"})
        ack = await receive_until(comm, lambda f, i=i: f["type"] == "message" and f.get("client_id") == f"c{i}")
        assert ack[-1]["role"] == "customer"
    await second.send_json_to({"type": "message", "client_id": "c3", "text": "one too many"})
    error = await receive_until(second, lambda f: f["type"] == "error")
    assert (error[-1]["code"], error[-1]["client_id"]) == ("rate_limited", "c3")
    assert 0 < error[-1]["retry_after"] <= 60
    # Another session has its own budget.
    other, _ = await open_chat(token_for(await database_sync_to_async(new_session_key)()))
    await other.send_json_to({"type": "message", "client_id": "x", "text": "hi"})
    assert (await receive_until(other, lambda f: f["type"] in {"message", "error"}))[-1]["type"] == "message"
    saved = await database_sync_to_async(Message.objects.filter(role="customer").count)()
    assert saved == 4
    for comm in (first, second, other):
        await comm.disconnect()


async def test_asking_for_a_human_hands_off_and_the_bot_stops(token, active_model):
    comm, _ = await open_chat(token)
    await comm.send_json_to({"type": "request_human"})
    frames = await receive_until(comm, lambda f: f["type"] == "handoff")
    assert frames[-1] == {"type": "handoff", "status": "waiting_for_agent", "reason": "customer_request"}
    await receive_until(comm, lambda f: f.get("role") == "system")  # the notice, from the conversation's group
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "Where is my order?"})
    frames = await receive_until(comm, lambda f: f.get("client_id") == "c-1")
    assert await comm.receive_nothing(timeout=1.5)  # no bot reply
    bot = await database_sync_to_async(Message.objects.filter(role="bot").count)()
    assert bot == 0
    await comm.disconnect()


async def test_a_keyword_hands_off_instead_of_answering(token, active_model):
    comm, _ = await open_chat(token)
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "I want to talk to a human"})
    frames = await receive_until(comm, lambda f: f["type"] == "handoff")
    assert frames[-1]["reason"] == "keyword"
    assert any(f["type"] == "message" and f["role"] == "system" for f in frames)
    assert await comm.receive_nothing(timeout=1.5)
    await comm.disconnect()


async def test_a_low_confidence_reply_hands_off(token, active_model, settings):
    # Every reply's mean log-probability is below 0, so a threshold of 0 marks it unsure.
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = 0.0
    comm, _ = await open_chat(token)
    frames = await ask(comm, "Where is my order?", "c-1")
    assert frames[-1]["status"] == "complete"
    frames = await receive_until(comm, lambda f: f["type"] == "handoff")
    assert frames[-1]["reason"] == "low_confidence"
    conversation = await database_sync_to_async(Conversation.objects.get)()
    assert conversation.status == "waiting_for_agent"
    await comm.disconnect()


async def test_without_a_model_the_chat_says_so_and_offers_a_human(token, no_model):
    comm, hello = await open_chat(token)
    assert hello["bot_available"] is False
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "Hello?"})
    frames = await receive_until(comm, lambda f: f["type"] == "message" and f["role"] == "system")
    assert "human" in frames[-1]["body"].lower()
    await comm.disconnect()


async def test_csat_is_saved_and_echoed(token, active_model):
    comm, _ = await open_chat(token)
    done = (await ask(comm, "Where is my order?", "c-1"))[-1]
    await comm.send_json_to({"type": "csat", "message_id": done["id"], "helpful": True})
    frame = await receive_until(comm, lambda f: f["type"] == "message" and f["id"] == done["id"])
    assert frame[-1]["helpful"] is True
    reply = await database_sync_to_async(Message.objects.get)(pk=done["id"])
    assert reply.helpful is True
    await comm.disconnect()


async def test_typing_reaches_the_other_sockets_only(token, no_model):
    await database_sync_to_async(ConversationFactory)(session_key=chat_token_read(token))
    first, _ = await open_chat(token)
    second, _ = await open_chat(token)
    await first.send_json_to({"type": "typing"})
    assert await second.receive_json_from(timeout=5) == {"type": "typing", "role": "customer"}
    assert await first.receive_nothing(timeout=0.5)
    await first.disconnect()
    await second.disconnect()


async def test_a_reply_cut_off_by_a_crash_is_flagged_on_resume(token, no_model):
    comm, _ = await open_chat(token)
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": "Where?"})
    started = (await receive_until(comm, lambda f: f.get("client_id") == "c-1"))[0]

    def crashed_reply():
        # What a process that died mid-reply leaves behind: streaming, stale heartbeat.
        conversation = Conversation.objects.get(pk=started["id"])
        question = conversation.messages.get(client_id="c-1")
        return Message.objects.create(
            conversation=conversation,
            role="bot",
            status="streaming",
            in_reply_to=question,
            body="Your ord",
            generation={"owner": "dead-host:1:x", "heartbeat": "2020-01-01T00:00:00+00:00", "seq": 2},
        )

    cut = await database_sync_to_async(crashed_reply)()
    await comm.send_json_to({"type": "resume", "after": 0})
    frames = await receive_until(comm, lambda f: f["type"] == "resumed")
    replayed = {f["id"]: f for f in frames if f["type"] == "message"}
    assert (replayed[cut.pk]["status"], replayed[cut.pk]["body"]) == ("failed", "Your ord")
    await comm.disconnect()


async def test_json_frames_are_json_objects_with_a_type(token, no_model):
    comm, hello = await open_chat(token)
    assert set(hello) >= {"type", "id", "status", "bot_available"}
    await comm.send_to(text_data=json.dumps({"type": "resume", "after": 0}))
    for frame in await receive_until(comm, lambda f: f["type"] == "resumed"):
        assert isinstance(frame.get("type"), str)
    await comm.disconnect()


async def test_an_idle_socket_keeps_working_on_redis(token, no_model, redis_url):
    # The Redis layer's blocking read (5 s) must not hit the client's read timeout.
    comm, _ = await open_chat(token)
    await asyncio.sleep(6.5)
    await comm.send_json_to({"type": "resume", "after": 0})
    assert (await receive_until(comm, lambda f: f["type"] == "resumed"))[-1]["count"] == 0
    await comm.disconnect()
