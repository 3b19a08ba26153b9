"""The chat against real daphne processes with a real websocket client (the ``websockets`` package).

The same flows as test_consumers.py, through the network stack production uses:
daphne's own handshake, Origin check and frame-size cap, sessions from HTTP, and
(with Redis) several processes sharing the channel layer and the rate limit.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest
from channels.db import database_sync_to_async
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conversations import services
from conversations.models import Conversation, Message
from tests.conversations.conftest import LOW_CONFIDENCE_OFF
from tests.factories import ConversationFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVER_ENV = {"SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD": str(LOW_CONFIDENCE_OFF), "SUPPORTBOT_RATE_LIMIT": "50"}


def chat_token(base: str, held: str = "") -> str:
    """What the chat page does first: POST /chat/session/ from the server's own origin."""
    request = urllib.request.Request(  # noqa: S310 - http URL of a local test server
        f"{base}/chat/session/",
        data=json.dumps({"token": held} if held else {}).encode(),
        headers={"Origin": base, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a local test server
        return json.loads(response.read())["token"]


def ws_url(base: str, token: str, path: str = "/ws/chat/", query: str = "") -> str:
    return base.replace("http://", "ws://") + f"{path}?token={token}" + (f"&{query}" if query else "")


async def open_socket(base: str, token: str, *, path: str = "/ws/chat/", origin: str | None = None, query: str = ""):
    ws = await connect(ws_url(base, token, path, query), origin=origin or base, proxy=None, open_timeout=15)
    hello = json.loads(await asyncio.wait_for(ws.recv(), 15))
    return ws, hello


async def until(ws, predicate, timeout: float = 120.0) -> list[dict]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if predicate(frame):
                return frames


async def silent(ws, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            frame = await ws.recv()
    except TimeoutError:
        return True
    raise AssertionError(f"Expected silence, got {frame}")


async def drain(ws) -> None:
    async with asyncio.timeout(10):
        while True:
            await ws.recv()


def is_done(frame: dict) -> bool:
    return frame["type"] == "reply_done"


def health(base: str) -> dict:
    """The /healthz report of the daphne process at ``base`` (200 or 503, the body says)."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=15) as response:  # noqa: S310 - local server
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def served_here(base: str) -> dict:
    """What the daphne process answering /healthz serves."""
    return health(base)["checks"]["model"]["this_process"]


def test_a_server_loads_the_active_model_before_the_first_chat(daphne_factory, served_model):
    base = daphne_factory(**SERVER_ENV)
    deadline = time.monotonic() + 60
    while (status := served_here(base))["serving"] is None and time.monotonic() < deadline:
        assert status["error"] is None, status
        time.sleep(0.5)
    assert status == {"serving": served_model.label, "loading": None, "error": None}

    cold = daphne_factory(**SERVER_ENV, SUPPORTBOT_PRELOAD_MODEL="0")
    assert served_here(cold) == {"serving": None, "loading": None, "error": None}


async def test_streaming_resend_and_resume_on_a_real_server(daphne_factory, served_model):
    base = daphne_factory(**SERVER_ENV)
    token = await asyncio.to_thread(chat_token, base)
    ws, hello = await open_socket(base, token)
    assert hello["type"] == "conversation"
    assert hello["bot_available"] is True

    # Streaming: the conversation starts, the message is acknowledged, then tokens, then the saved reply.
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    started, *frames = await until(ws, is_done)
    assert started["type"] == "conversation"
    assert frames[0]["type"] == "message"
    assert frames[0]["client_id"] == "c-1"
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens
    assert "".join(t["delta"] for t in tokens).strip() == frames[-1]["body"]
    assert frames[-1]["status"] == "complete"
    assert frames[-1]["model_version"] == served_model.label

    # Idempotent resend: the same server id, no second answer.
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    again = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert again["id"] == frames[0]["id"]
    assert await silent(ws, 1.0)

    # Disconnect right after asking; the reply is still written; resume replays it.
    await ws.send(json.dumps({"type": "message", "client_id": "c-2", "text": "And my refund?"}))
    ack = (await until(ws, lambda f: f.get("client_id") == "c-2"))[-1]
    await ws.close()
    # A reload keeps its token (renewed), and so its conversation.
    token = await asyncio.to_thread(chat_token, base, token)
    ws, hello_again = await open_socket(base, token)
    assert hello_again["id"] == started["id"]
    await ws.send(json.dumps({"type": "resume", "after": frames[-1]["id"]}))
    replayed = [f for f in await until(ws, lambda f: f["type"] == "resumed") if f["type"] == "message"]
    assert replayed[0]["id"] == ack["id"]
    reply = [f for f in replayed if f["role"] == "bot"]
    if reply and reply[0]["status"] == "streaming":  # still being written: the rest streams in
        done = (await until(ws, lambda f: is_done(f) and f["id"] == reply[0]["id"]))[-1]
    else:
        done = reply[0]
    assert done["status"] == "complete"
    assert done["body"]
    await ws.close()


async def test_a_server_with_a_connection_pool_answers_concurrent_chats(daphne_factory, served_model, postgres):
    """DJANGO_DB_POOL=auto pools in daphne on PostgreSQL; fewer pooled connections than chats asking at once."""
    base = daphne_factory(**SERVER_ENV, DJANGO_DB_POOL_MAX_SIZE="2")
    assert (await asyncio.to_thread(health, base))["checks"]["database"]["pooled"] is True
    unpooled = daphne_factory(**SERVER_ENV, DJANGO_DB_POOL="0")
    assert (await asyncio.to_thread(health, unpooled))["checks"]["database"]["pooled"] is False

    async def ask(n: int) -> dict:
        token = await asyncio.to_thread(chat_token, base)
        ws, _ = await open_socket(base, token)
        await ws.send(json.dumps({"type": "message", "client_id": f"p-{n}", "text": "Where is my order?"}))
        done = (await until(ws, is_done))[-1]
        await ws.close()
        return done

    replies = await asyncio.gather(*(ask(n) for n in range(5)))
    assert [r["status"] for r in replies] == ["complete"] * 5
    assert all(r["body"] for r in replies)


async def test_abuse_is_refused_on_a_real_server(daphne_factory, served_model):
    base = daphne_factory(**{**SERVER_ENV, "SUPPORTBOT_RATE_LIMIT": "3"})
    token = await asyncio.to_thread(chat_token, base)

    # A foreign Origin never gets a socket (daphne answers the handshake with 403).
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url(base, token), origin="https://evil.example", proxy=None)
    assert refused.value.response.status_code == 403

    ws, _ = await open_socket(base, token)
    # Not JSON, missing fields, oversize text: an error frame each, the socket stays open.
    await ws.send("hello?")
    assert json.loads(await ws.recv())["code"] == "bad_json"
    await ws.send(json.dumps({"type": "message", "text": "no client id"}))
    assert json.loads(await ws.recv())["code"] == "bad_frame"
    await ws.send(json.dumps({"type": "message", "client_id": "big", "text": "x" * 5000}))
    error = json.loads(await ws.recv())
    assert (error["code"], error["client_id"]) == ("too_long", "big")

    # Rate limit: the fourth message frame in a minute is refused, and not saved. (The
    # refused oversize message above counted too: a fresh session starts at zero.)
    await ws.close()
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    for i in range(3):
        await ws.send(json.dumps({"type": "message", "client_id": f"c{i}", "text": f"question {i}?"}))
        await until(ws, lambda f, i=i: f.get("client_id") == f"c{i}" and f["type"] == "message")
    await ws.send(json.dumps({"type": "message", "client_id": "c3", "text": "one more"}))
    error = (await until(ws, lambda f: f["type"] == "error"))[-1]
    assert (error["code"], error["client_id"]) == ("rate_limited", "c3")
    assert not await database_sync_to_async(Message.objects.filter(client_id="c3").exists)()

    # A frame over daphne's --websocket-max-message-size drops the connection.
    await ws.send("x" * 70000)
    with pytest.raises(ConnectionClosed):
        await drain(ws)

    # Someone else's conversation: accepted, told why, closed with 4403.
    theirs = await database_sync_to_async(ConversationFactory)(session_key="y" * 32)
    ws, error = await open_socket(base, token, path=f"/ws/chat/{theirs.pk}/")
    assert error["code"] == "forbidden"
    with pytest.raises(ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd.code == 4403


async def test_handoff_on_a_real_server(daphne_factory, served_model):
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    await ws.send(json.dumps({"type": "request_human"}))
    handoff = (await until(ws, lambda f: f["type"] == "handoff"))[-1]
    assert handoff == {"type": "handoff", "status": "waiting_for_agent", "reason": "customer_request"}
    await until(ws, lambda f: f.get("role") == "system")  # the notice, from the conversation's group
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    await until(ws, lambda f: f.get("client_id") == "c-1")
    assert await silent(ws, 2.0)  # the bot stopped answering
    await ws.close()


async def test_two_processes_share_the_stream_and_the_rate_limit(daphne_factory, served_model, redis_url):
    env = {**SERVER_ENV, "SUPPORTBOT_RATE_LIMIT": "3"}
    first, second = daphne_factory(**env), daphne_factory(**env)
    token = await asyncio.to_thread(chat_token, first)
    tab_a, _ = await open_socket(first, token)
    await tab_a.send(json.dumps({"type": "message", "client_id": "c-0", "text": "Where is my order?"}))
    started = (await until(tab_a, is_done))[0]
    tab_b, hello_b = await open_socket(second, token)
    assert hello_b["id"] == started["id"]

    # A question asked in one process streams to the customer's tab in the other.
    await tab_a.send(json.dumps({"type": "message", "client_id": f"c-{uuid.uuid4()}", "text": "Hello there"}))
    seen = await until(tab_b, is_done)
    assert any(f["type"] == "token" for f in seen)
    assert seen[-1]["body"] == (await until(tab_a, is_done))[-1]["body"]

    # The session's budget (3 a minute) is counted across both processes: two messages
    # went through the first, one through the second, and the fourth is refused.
    await tab_b.send(json.dumps({"type": "message", "client_id": "c-2", "text": "human please"}))
    await until(tab_b, lambda f: f.get("client_id") == "c-2")
    await tab_a.send(json.dumps({"type": "message", "client_id": "c-3", "text": "anyone?"}))
    error = (await until(tab_a, lambda f: f["type"] == "error"))[-1]
    assert (error["code"], error["client_id"]) == ("rate_limited", "c-3")
    await tab_a.close()
    await tab_b.close()


async def test_a_conversation_starts_at_the_first_message(daphne_factory, served_model):
    """Opening the chat creates nothing; the first message starts the conversation, for every tab."""
    base = daphne_factory(**SERVER_ENV)
    token = await asyncio.to_thread(chat_token, base)
    tab_a, hello_a = await open_socket(base, token, query="segment=pro&page=https://shop.example/cart")
    tab_b, hello_b = await open_socket(base, token)
    assert (hello_a["id"], hello_a["status"], hello_a["bot_available"]) == (None, "bot", True)
    assert hello_b["id"] is None
    assert not await database_sync_to_async(Conversation.objects.exists)()  # no empty conversation for agents

    await tab_a.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    started = json.loads(await asyncio.wait_for(tab_a.recv(), 15))
    assert started["type"] == "conversation"
    assert started["id"]
    frames = await until(tab_a, is_done)
    assert frames[0]["client_id"] == "c-1"
    assert frames[-1]["status"] == "complete"

    # The other tab hears that the conversation started, and replays it with resume.
    announced = (await until(tab_b, lambda f: f["type"] == "conversation"))[-1]
    assert announced["id"] == started["id"]
    await tab_b.send(json.dumps({"type": "resume", "after": 0}))
    replayed = {f["id"] for f in await until(tab_b, lambda f: f["type"] == "resumed") if f["type"] == "message"}
    assert {frames[0]["id"], frames[-1]["id"]} <= replayed  # the question and its reply
    # ...and follows it live from then on.
    await tab_a.send(json.dumps({"type": "message", "client_id": "c-2", "text": "Thanks"}))
    assert (await until(tab_b, lambda f: f.get("client_id") == "c-2"))[-1]["body"] == "Thanks"

    conversation = await database_sync_to_async(Conversation.objects.get)()
    assert str(conversation.pk) == started["id"]
    assert (conversation.segment, conversation.metadata["page"]) == ("pro", "https://shop.example/cart")
    await tab_a.close()
    await tab_b.close()


async def test_a_message_to_a_conversation_closed_meanwhile_is_refused(daphne_factory, served_model):
    base = daphne_factory(**SERVER_ENV)
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    started = (await until(ws, is_done))[0]
    # An agent closes the conversation while the customer's socket stays open.
    await database_sync_to_async(Conversation.objects.filter(pk=started["id"]).update)(status="closed")

    await ws.send(json.dumps({"type": "message", "client_id": "c-2", "text": "One more thing"}))
    error = (await until(ws, lambda f: f["type"] == "error"))[-1]
    assert (error["code"], error["client_id"]) == ("conversation_closed", "c-2")
    assert "closed" in error["message"]
    assert "start a new conversation" in error["message"]
    assert not await database_sync_to_async(Message.objects.filter(client_id="c-2").exists)()
    assert await silent(ws, 1.0)  # no reply either

    # What the message says to do: reload, and the next message starts a new conversation.
    await ws.close()
    ws, hello = await open_socket(base, token)
    assert hello["id"] is None
    await ws.send(json.dumps({"type": "message", "client_id": "c-2", "text": "One more thing"}))
    again = (await until(ws, lambda f: f["type"] == "conversation"))[-1]
    assert again["id"] != started["id"]
    await until(ws, is_done)
    await ws.close()


async def test_healthz_stays_green_while_chat_sockets_read_the_layer(daphne_factory, served_model, redis_url):
    """/healthz's channel-layer probe has a channel of its own: open sockets and the model
    listener, reading the layer in the same process, are no obstacle to it."""
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    before = await asyncio.to_thread(health, base)
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    await until(ws, is_done)
    after = [await asyncio.to_thread(health, base) for _ in range(3)]
    for report in (before, *after):
        assert report["checks"]["channel_layer"]["ok"], report
        assert report["status"] == "ok", report
    await ws.close()


async def test_the_bot_answers_after_a_hand_back_whose_frame_never_reached_the_socket(
    daphne_factory, served_model, agent
):
    """Whether the bot answers is read from the database, not from what the socket last heard.

    daphne runs on the in-memory channel layer (the default), so the hand-back this test
    process makes (as an agent's server would) never reaches the customer's socket: it
    still believes an agent has the conversation."""
    base = daphne_factory(**SERVER_ENV, REDIS_URL="")
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    conversation_id = (await until(ws, lambda f: f["type"] == "conversation" and f["id"]))[-1]["id"]
    await until(ws, is_done)
    await ws.close()

    await database_sync_to_async(services.conversation_take_over)(conversation_id=conversation_id, agent=agent)
    ws, hello = await open_socket(base, token)
    assert (hello["id"], hello["status"]) == (conversation_id, "with_agent")
    # Written while the agent has the conversation: the bot stays quiet.
    await ws.send(json.dumps({"type": "message", "client_id": "c-2", "text": "Can I change my address?"}))
    ack = (await until(ws, lambda f: f.get("client_id") == "c-2"))[-1]
    assert await silent(ws, 2.0)
    await database_sync_to_async(services.conversation_hand_back)(conversation_id=conversation_id, agent=agent)
    assert await silent(ws, 1.0)  # the hand-back frame is lost

    # The widget resumes (as after a network blip): the handed-back conversation's
    # unanswered message is the bot's now, as it would be after a reconnect.
    await ws.send(json.dumps({"type": "resume", "after": ack["id"]}))
    frames = await until(ws, is_done, timeout=90)
    handoff = next(f for f in frames if f["type"] == "handoff")
    assert handoff["status"] == "bot"
    assert (frames[-1]["status"], frames[-1]["model_version"]) == ("complete", served_model.label)

    # And the next message is answered too.
    await ws.send(json.dumps({"type": "message", "client_id": "c-3", "text": "How do I reset my password?"}))
    done = (await until(ws, is_done, timeout=90))[-1]
    assert done["status"] == "complete"
    await ws.close()
