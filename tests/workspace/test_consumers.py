"""The agents' socket in-process (WebsocketCommunicator on the real ASGI stack): who may open it, live
queues and waiting count, a live conversation with typing both ways and the agent's messages."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client, override_settings

from conversations import services
from conversations.models import Conversation
from conversations.review import services as review
from tests.conversations.conftest import new_session_key, open_chat, receive_until, start_conversation, token_for
from tests.factories import ConversationFactory, UserFactory, bot_reply

pytestmark = pytest.mark.django_db(transaction=True)


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def agent_socket(cookie: str | None, path: str = "/ws/agent/") -> WebsocketCommunicator:
    with override_settings(SUPPORTBOT_PRELOAD_MODEL=False):
        from supportbot.asgi import application
    headers = [(b"origin", b"http://testserver")]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


async def open_agent(user, path: str = "/ws/agent/") -> tuple[WebsocketCommunicator, dict]:
    comm = agent_socket(await database_sync_to_async(session_cookie)(user), path)
    connected, code = await comm.connect(timeout=10)
    assert connected, code
    hello = await comm.receive_json_from(timeout=10)
    assert hello["type"] == "hello", hello
    return comm, hello


async def refused_with(comm: WebsocketCommunicator) -> int:
    connected, _ = await comm.connect(timeout=10)
    assert connected  # accepted, told why, then closed
    error = await comm.receive_json_from(timeout=5)
    assert error["type"] == "error"
    closed = await comm.receive_output(timeout=5)
    assert closed["type"] == "websocket.close"
    await comm.disconnect()  # let the consumer finish, as a client hanging up would
    return closed["code"]


async def test_anonymous_and_customer_sockets_are_closed_with_4403(transactional_db):
    assert await refused_with(agent_socket(None)) == 4403
    customer = await database_sync_to_async(UserFactory)(username="shopper")
    cookie = await database_sync_to_async(session_cookie)(customer)
    assert await refused_with(agent_socket(cookie)) == 4403
    conversation = await database_sync_to_async(ConversationFactory)()
    assert await refused_with(agent_socket(cookie, f"/ws/agent/conversations/{conversation.pk}/")) == 4403
    # A foreign Origin never gets that far.
    with override_settings(SUPPORTBOT_PRELOAD_MODEL=False):
        from supportbot.asgi import application
    foreign = WebsocketCommunicator(application, "/ws/agent/", headers=[(b"origin", b"http://evil.example")])
    connected, _ = await foreign.connect(timeout=5)
    assert not connected
    await foreign.disconnect()  # the refusing app waits for the client to hang up, as a browser does


async def test_the_header_count_and_the_queues_update_live(agent):
    comm, hello = await open_agent(agent)
    try:
        assert (hello["agent"], hello["waiting"], hello["queues"]["all"]) == ("Sam", 0, 0)
        conversation = await database_sync_to_async(ConversationFactory)()
        await database_sync_to_async(services.conversation_request_human)(conversation=conversation)
        frames = await receive_until(comm, lambda f: f["type"] == "waiting")
        assert frames[-1]["count"] == 1
        added = next(f for f in frames if f["type"] == "queue_item")
        assert (added["change"], added["source"], added["kind"]) == ("added", "handoff", "conversation")
        assert any(f["type"] == "handoff_requested" and f["reason"] == "customer_request" for f in frames)

        reply = await database_sync_to_async(bot_reply)(question="Where is my parcel?", body="It ships today.")
        await database_sync_to_async(review.queue_item_add)(message=reply, source="flagged")
        frame = (await receive_until(comm, lambda f: f["type"] == "queue_item"))[-1]
        assert (frame["source"], frame["question"], frame["reply"]) == (
            "flagged",
            "Where is my parcel?",
            "It ships today.",
        )
        assert frame["url"] == f"/agent/items/{frame['id']}/"

        await comm.send_json_to({"type": "renew", "item": frame["id"]})
        claimed = await receive_until(comm, lambda f: f["type"] == "claim")
        assert claimed[-1]["item"] == frame["id"]

        await comm.send_json_to({"type": "counts"})
        counts = await receive_until(comm, lambda f: f["type"] == "hello")
        assert counts[-1]["queues"]["flagged"] == 1
        assert counts[-1]["waiting"] == 1
    finally:
        await comm.disconnect()


async def test_bad_frames_get_an_error_and_the_socket_stays_open(agent):
    comm, _ = await open_agent(agent)
    try:
        for raw, code in (
            ("not json", "bad_json"),
            ("[1]", "bad_frame"),
            ('{"type": "dance"}', "unknown_type"),
            ('{"type": "renew", "item": "1"}', "bad_frame"),
            ('{"type": "renew", "item": 999999}', "not_found"),
            ('{"type": "message", "client_id": "x", "text": "hi"}', "bad_frame"),  # not a conversation socket
        ):
            await comm.send_to(text_data=raw)
            frame = await comm.receive_json_from(timeout=5)
            assert (frame["type"], frame["code"]) == ("error", code), raw
        await comm.send_to(text_data="x" * 20000)
        assert (await comm.receive_json_from(timeout=5))["code"] == "too_long"
        await comm.send_json_to({"type": "counts"})
        assert (await comm.receive_json_from(timeout=5))["type"] == "hello"
    finally:
        await comm.disconnect()


async def test_a_live_conversation_typing_both_ways_and_the_agents_messages(agent, other_agent, no_model):
    token = token_for(await database_sync_to_async(new_session_key)())
    customer, _ = await open_chat(token)
    conversation_id = await start_conversation(customer, "Hello")  # a conversation starts at its first message
    path = f"/ws/agent/conversations/{conversation_id}/"
    watcher, _ = await open_agent(agent, path)
    bystander, _ = await open_agent(other_agent, path)
    try:
        await customer.send_json_to({"type": "message", "client_id": "c-1", "text": "Is anyone there?"})
        seen = await receive_until(watcher, lambda f: f["type"] == "message" and f["role"] == "customer")
        assert seen[-1]["body"] == "Is anyone there?"

        # Writing needs the conversation.
        await watcher.send_json_to({"type": "message", "client_id": "a-0", "text": "Hi"})
        refused = await receive_until(watcher, lambda f: f["type"] == "error")
        assert refused[-1]["code"] == "not_taken_over"

        await database_sync_to_async(services.conversation_take_over)(conversation_id=conversation_id, agent=agent)
        status = await receive_until(customer, lambda f: f["type"] == "handoff")
        assert (status[-1]["status"], status[-1]["agent_name"]) == ("with_agent", "Sam")
        await receive_until(watcher, lambda f: f["type"] == "handoff")

        # Typing, both ways.
        await customer.send_json_to({"type": "typing"})
        typing = await receive_until(watcher, lambda f: f["type"] == "typing")
        assert typing[-1]["role"] == "customer"
        await watcher.send_json_to({"type": "typing"})
        typing = await receive_until(customer, lambda f: f["type"] == "typing")
        assert typing[-1] == {"type": "typing", "role": "agent", "name": "Sam"}
        # Someone watching who does not have the conversation shows as nobody typing.
        await bystander.send_json_to({"type": "typing"})
        await bystander.send_json_to({"type": "message", "client_id": "b-1", "text": "Me too"})
        error = await receive_until(bystander, lambda f: f["type"] == "error")
        assert error[-1]["code"] == "claimed"
        assert await customer.receive_nothing(timeout=1.0)

        await watcher.send_json_to({"type": "message", "client_id": "a-1", "text": "Yes, Sam here. How can I help?"})
        echo = await receive_until(watcher, lambda f: f["type"] == "message" and f["role"] == "agent")
        assert echo[-1]["author_name"] == "Sam"
        got = await receive_until(customer, lambda f: f["type"] == "message" and f["role"] == "agent")
        assert (got[-1]["body"], got[-1]["author_name"]) == ("Yes, Sam here. How can I help?", "Sam")

        # A page that (re)connects asks for what it missed.
        await watcher.send_json_to({"type": "resume", "after": 0})
        replay = await receive_until(watcher, lambda f: f["type"] == "handoff")
        bodies = [f["body"] for f in replay if f["type"] == "message"]
        # (The group's copy of the agent's own message may come first; the replay follows in id order.)
        first = bodies.index("Is anyone there?")
        assert "Yes, Sam here. How can I help?" in bodies[first:]
        assert replay[-1]["status"] == "with_agent"

        await database_sync_to_async(services.conversation_close)(conversation_id=conversation_id, agent=agent)
        closed = await receive_until(customer, lambda f: f["type"] == "handoff")
        assert closed[-1]["status"] == "closed"
        await customer.send_json_to({"type": "message", "client_id": "c-2", "text": "Wait"})
        error = await receive_until(customer, lambda f: f["type"] == "error")
        assert error[-1]["code"] == "conversation_closed"
        status = await database_sync_to_async(lambda: Conversation.objects.get(pk=conversation_id).status)()
        assert status == "closed"
    finally:
        for comm in (customer, watcher, bystander):
            await comm.disconnect()


async def test_a_conversation_socket_for_an_unknown_conversation_is_closed_with_4404(agent):
    cookie = await database_sync_to_async(session_cookie)(agent)
    comm = agent_socket(cookie, "/ws/agent/conversations/00000000-0000-0000-0000-000000000000/")
    assert await refused_with(comm) == 4404
