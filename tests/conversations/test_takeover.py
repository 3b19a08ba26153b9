"""An agent takes a conversation over: the bot stops, the agent writes, hands back or closes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from conversations import replies, services
from conversations.models import Conversation, Message, QueueItem
from conversations.review import services as review
from finetune.serving.runtime import model_listener_stop
from supportbot.errors import ApplicationError
from tests.conversations.conftest import new_session_key, open_chat, receive_until, start_conversation, token_for
from tests.factories import ConversationFactory, UserFactory

pytestmark = pytest.mark.django_db


def waiting_conversation() -> Conversation:
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="My parcel is lost")
    services.conversation_request_human(conversation=conversation)
    conversation.refresh_from_db()
    return conversation


def test_taking_over_stops_the_bot_and_tells_the_customer_who_joined(agent, django_capture_on_commit_callbacks):
    conversation = waiting_conversation()
    with django_capture_on_commit_callbacks() as callbacks:
        taken = services.conversation_take_over(conversation_id=conversation.pk, agent=agent)
    assert (taken.status, taken.assigned_agent, taken.agent_display_name) == ("with_agent", agent, "Sam")
    assert taken.handoff_reason == "customer_request"  # why the customer came stays on record
    notice = conversation.messages.filter(role=Message.Role.SYSTEM).last()
    assert notice.body == "Sam from the support team joined the chat."
    entry = QueueItem.objects.get(source="handoff")
    assert (entry.state, entry.resolution, entry.resolved_by) == ("submitted", "taken_over", agent)
    assert len(callbacks) >= 3  # the notice, the status change, the queue entry, the waiting count
    # The bot does not start a reply in a conversation an agent has.
    services.message_create_customer(conversation=taken, client_id="c2", text="Hello?")
    assert services.bot_reply_start(conversation=taken, model_label="v1", params={}, owner="t:1") is None
    assert not conversation.messages.filter(role=Message.Role.BOT).exists()
    # Taking it over again is a no-op for the same agent.
    assert services.conversation_take_over(conversation_id=conversation.pk, agent=agent).status == "with_agent"


def test_an_agent_can_take_over_a_conversation_the_bot_is_answering(agent):
    conversation = ConversationFactory()
    taken = services.conversation_take_over(conversation_id=conversation.pk, agent=agent)
    assert (taken.status, taken.handoff_reason) == ("with_agent", "agent_takeover")


def test_agent_messages_need_the_conversation_and_are_idempotent(agent, other_agent):
    conversation = waiting_conversation()
    with pytest.raises(ApplicationError) as caught:
        services.message_create_agent(conversation_id=conversation.pk, agent=agent, client_id="a1", text="Hi")
    assert caught.value.code == "not_taken_over"
    services.conversation_take_over(conversation_id=conversation.pk, agent=agent)
    message, created = services.message_create_agent(
        conversation_id=conversation.pk, agent=agent, client_id="a1", text="  Hi, I am looking into it.  "
    )
    again, created_again = services.message_create_agent(
        conversation_id=conversation.pk, agent=agent, client_id="a1", text="Hi, I am looking into it."
    )
    assert (created, created_again, again.pk) == (True, False, message.pk)
    assert (message.role, message.author, message.body) == ("agent", agent, "Hi, I am looking into it.")
    assert message.generation["author_name"] == "Sam"
    with pytest.raises(ApplicationError) as caught:
        services.message_create_agent(conversation_id=conversation.pk, agent=other_agent, client_id="a2", text="Hi")
    assert (caught.value.code, caught.value.message) == ("claimed", "Sam has this conversation.")
    for text, code in (("   ", "empty"), ("x" * 5000, "too_long")):
        with pytest.raises(ApplicationError) as caught:
            services.message_create_agent(conversation_id=conversation.pk, agent=agent, client_id="a3", text=text)
        assert caught.value.code == code
    assert conversation.messages.filter(role=Message.Role.AGENT).count() == 1


def test_takeover_is_refused_for_closed_held_or_claimed_conversations(agent, other_agent):
    closed = ConversationFactory(status=Conversation.Status.CLOSED)
    with pytest.raises(ApplicationError) as caught:
        services.conversation_take_over(conversation_id=closed.pk, agent=agent)
    assert caught.value.code == "conversation_closed"
    assert "is closed; it cannot be taken over" in caught.value.message

    held = waiting_conversation()
    services.conversation_take_over(conversation_id=held.pk, agent=other_agent)
    with pytest.raises(ApplicationError) as caught:
        services.conversation_take_over(conversation_id=held.pk, agent=agent)
    assert (caught.value.code, caught.value.message) == ("claimed", "Alex has this conversation.")

    claimed = waiting_conversation()
    entry = QueueItem.objects.get(conversation=claimed, source="handoff")
    review.queue_item_claim(item_id=entry.pk, agent=other_agent)
    with pytest.raises(ApplicationError) as caught:
        services.conversation_take_over(conversation_id=claimed.pk, agent=agent)
    assert caught.value.code == "claimed"
    claimed.refresh_from_db()
    assert claimed.status == "waiting_for_agent"  # nothing changed
    QueueItem.objects.filter(pk=entry.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.conversation_take_over(conversation_id=claimed.pk, agent=agent).status == "with_agent"

    customer = UserFactory(username="shopper")
    with pytest.raises(ApplicationError) as caught:
        services.conversation_take_over(conversation_id=ConversationFactory().pk, agent=customer)
    assert caught.value.code == "forbidden"


def test_hand_back_and_close(agent, other_agent):
    conversation = waiting_conversation()
    services.conversation_take_over(conversation_id=conversation.pk, agent=agent)
    with pytest.raises(ApplicationError) as caught:
        services.conversation_hand_back(conversation_id=conversation.pk, agent=other_agent)
    assert caught.value.code == "claimed"
    back = services.conversation_hand_back(conversation_id=conversation.pk, agent=agent)
    assert (back.status, back.assigned_agent, back.agent_display_name, back.handoff_reason) == ("bot", None, "", "")
    assert conversation.messages.last().body.startswith("Sam handed the chat back to the assistant.")

    closed = services.conversation_close(conversation_id=conversation.pk, agent=agent)
    assert closed.status == "closed"
    assert closed.ended_at is not None
    with pytest.raises(ApplicationError) as caught:
        services.conversation_close(conversation_id=conversation.pk, agent=agent)
    assert caught.value.code == "conversation_closed"
    with pytest.raises(ApplicationError) as caught:
        services.message_create_customer(conversation=closed, client_id="late", text="Still there?")
    assert caught.value.code == "conversation_closed"


def test_closing_a_waiting_conversation_clears_its_handoff_entry(agent):
    conversation = waiting_conversation()
    services.conversation_close(conversation_id=conversation.pk, agent=agent)
    entry = QueueItem.objects.get(source="handoff")
    assert (entry.state, entry.resolution) == ("discarded", "closed")


@pytest.mark.django_db(transaction=True)
async def test_the_customer_sees_the_takeover_and_the_agents_messages_live_and_the_bot_stays_quiet(active_model, agent):
    token = token_for(await database_sync_to_async(new_session_key)())
    comm, _ = await open_chat(token)
    try:
        conversation_id = await start_conversation(comm, "Where is my order?", client_id="c-1")
        await receive_until(comm, lambda f: f["type"] == "reply_done")

        await database_sync_to_async(services.conversation_take_over)(conversation_id=conversation_id, agent=agent)
        frames = await receive_until(comm, lambda f: f["type"] == "handoff")
        assert frames[-1] == {
            "type": "handoff",
            "status": "with_agent",
            "reason": "agent_takeover",
            "agent_name": "Sam",
        }
        assert any(f["type"] == "message" and f["body"] == "Sam from the support team joined the chat." for f in frames)

        # The customer writes; nobody but the agent answers.
        await comm.send_json_to({"type": "message", "client_id": "c-2", "text": "How do I reset my password?"})
        ack = await receive_until(comm, lambda f: f["type"] == "message" and f.get("client_id") == "c-2")
        assert ack[-1]["role"] == "customer"
        await database_sync_to_async(services.message_create_agent)(
            conversation_id=conversation_id, agent=agent, client_id="a-1", text="Let me check that for you."
        )
        frames = await receive_until(comm, lambda f: f["type"] == "message" and f["role"] == "agent")
        assert [f["type"] for f in frames if f["type"] in ("token", "reply_done")] == []
        assert (frames[-1]["body"], frames[-1]["author_name"]) == ("Let me check that for you.", "Sam")
        bot_replies = await database_sync_to_async(
            Message.objects.filter(conversation_id=conversation_id, role=Message.Role.BOT).count
        )()
        assert bot_replies == 1

        # Handed back, the bot answers the next question.
        await database_sync_to_async(services.conversation_hand_back)(conversation_id=conversation_id, agent=agent)
        frames = await receive_until(comm, lambda f: f["type"] == "handoff")
        assert (frames[-1]["status"], frames[-1].get("agent_name")) == ("bot", None)
        await comm.send_json_to({"type": "message", "client_id": "c-3", "text": "Can I change my address?"})
        done = await receive_until(comm, lambda f: f["type"] == "reply_done")
        assert done[-1]["status"] == "complete"
    finally:
        await comm.disconnect()
        await model_listener_stop()


class _SlowEngine:
    """The real engine with a pause before every event: a reply still streams when the agent steps in."""

    def __init__(self, engine, delay_s: float):
        self._engine, self._delay_s = engine, delay_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stream(self, request):
        async for event in self._engine.stream(request):
            await asyncio.sleep(self._delay_s)
            yield event


@pytest.fixture
def slow_replies(monkeypatch):
    real = replies.get_engine

    async def slow_get_engine():
        engine = await real()
        return None if engine is None else _SlowEngine(engine, 0.4)

    monkeypatch.setattr(replies, "get_engine", slow_get_engine)


@pytest.mark.django_db(transaction=True)
async def test_a_reply_streaming_when_an_agent_takes_over_stops(active_model, agent, slow_replies):
    token = token_for(await database_sync_to_async(new_session_key)())
    comm, _ = await open_chat(token)
    try:
        conversation_id = await start_conversation(comm, "Where is my order?", client_id="c-1")
        await receive_until(comm, lambda f: f["type"] == "token")
        await database_sync_to_async(services.conversation_take_over)(conversation_id=conversation_id, agent=agent)
        frames = await receive_until(comm, lambda f: f["type"] == "reply_done", timeout=60)
        assert frames[-1]["status"] == "failed"
        reply = await database_sync_to_async(Message.objects.get)(conversation_id=conversation_id, role="bot")
        assert reply.generation["finish_reason"] == "taken_over"
        assert reply.generation["error"].startswith("An agent took the conversation over")
        conversation = await database_sync_to_async(Conversation.objects.get)(pk=conversation_id)
        assert (conversation.status, conversation.handoff_reason) == (
            "with_agent",
            "agent_takeover",
        )  # no error handoff
        assert await comm.receive_nothing(timeout=1.0)  # no token after the reply ended
    finally:
        await comm.disconnect()
        await model_listener_stop()


@pytest.mark.django_db(transaction=True)
async def test_a_reply_whose_socket_left_stops_at_its_next_heartbeat_after_a_takeover(
    active_model, agent, slow_replies, monkeypatch
):
    monkeypatch.setattr(services, "REPLY_HEARTBEAT_S", 0.5)
    token = token_for(await database_sync_to_async(new_session_key)())
    comm, _ = await open_chat(token)
    conversation_id = await start_conversation(comm, "Where is my order?", client_id="c-1")
    await receive_until(comm, lambda f: f["type"] == "token")
    await comm.disconnect()  # the runner goes on writing with nobody here to hear the status change
    try:
        await database_sync_to_async(services.conversation_take_over)(conversation_id=conversation_id, agent=agent)
        await replies.replies_wait(timeout=60)
        reply = await database_sync_to_async(Message.objects.get)(conversation_id=conversation_id, role="bot")
        assert (reply.status, reply.generation["finish_reason"]) == ("failed", "taken_over")
    finally:
        await model_listener_stop()
