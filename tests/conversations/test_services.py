"""The chat's rules, service by service (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from conversations import services
from conversations.models import BotProfile, Conversation, Message
from conversations.selectors import conversation_language, messages_after, prompt_messages
from finetune.serving.interface import GenerationDone
from supportbot.errors import ApplicationError
from tests.factories import ConversationFactory, MessageFactory, ModelVersionFactory, UserFactory

pytestmark = pytest.mark.django_db

OWNER = "test-host:1:abc"


def done(text="Your order ships today.", reason="stop", logprob=-0.5, label="v1") -> GenerationDone:
    return GenerationDone(
        text=text,
        finish_reason=reason,
        token_count=7,
        mean_logprob=logprob,
        model_label=label,
        first_token_ms=12,
        latency_ms=80,
    )


def start_reply(conversation, label="v1", live_ids=()):
    return services.bot_reply_start(
        conversation=conversation, model_label=label, params={"max_new_tokens": 160}, owner=OWNER, live_ids=live_ids
    )


def age_heartbeat(reply: Message, seconds: float) -> None:
    reply.refresh_from_db()
    beat = timezone.now() - timedelta(seconds=seconds)
    Message.objects.filter(pk=reply.pk).update(generation={**reply.generation, "heartbeat": beat.isoformat()})


# --- opening conversations ---------------------------------------------------------------


def test_a_session_reopens_its_own_open_conversation():
    first = services.conversation_open_for_session(session_key="s" * 32, segment="pro", metadata={"page": "/x"})
    again = services.conversation_open_for_session(session_key="s" * 32)
    other = services.conversation_open_for_session(session_key="t" * 32)
    assert again.pk == first.pk
    assert other.pk != first.pk
    assert (first.segment, first.metadata) == ("pro", {"page": "/x"})


def test_a_closed_conversation_is_not_reopened():
    first = services.conversation_open_for_session(session_key="s" * 32)
    Conversation.objects.filter(pk=first.pk).update(status=Conversation.Status.CLOSED)
    assert services.conversation_open_for_session(session_key="s" * 32).pk != first.pk


def test_another_sessions_conversation_is_refused_like_a_missing_one():
    mine = ConversationFactory(session_key="a" * 32)
    assert services.conversation_open_for_session(session_key="a" * 32, conversation_id=mine.pk).pk == mine.pk
    with pytest.raises(ApplicationError) as refused:
        services.conversation_open_for_session(session_key="b" * 32, conversation_id=mine.pk)
    assert refused.value.code == "forbidden"
    with pytest.raises(ApplicationError) as missing:
        services.conversation_open_for_session(session_key="a" * 32, conversation_id=uuid.UUID(int=0))
    assert missing.value.code == "forbidden"


def test_a_signed_in_customers_conversation_follows_the_user_not_the_session():
    user, stranger = UserFactory(), UserFactory()
    conversation = services.conversation_open_for_session(session_key="a" * 32, user=user)
    assert conversation.customer == user
    assert services.conversation_open_for_session(session_key="z" * 32, user=user).pk == conversation.pk
    with pytest.raises(ApplicationError):
        services.conversation_open_for_session(session_key="a" * 32, user=stranger, conversation_id=conversation.pk)


def test_the_database_holds_one_open_conversation_per_customer():
    services.conversation_open_for_session(session_key="s" * 32)
    with pytest.raises(IntegrityError), transaction.atomic():
        Conversation.objects.create(session_key="s" * 32)
    Conversation.objects.filter(session_key="s" * 32).update(status=Conversation.Status.CLOSED)
    Conversation.objects.create(session_key="s" * 32)  # a closed one does not count
    user = UserFactory()
    services.conversation_open_for_session(session_key="a" * 32, user=user)
    with pytest.raises(IntegrityError), transaction.atomic():
        Conversation.objects.create(session_key="b" * 32, customer=user)


@pytest.mark.django_db(transaction=True)
def test_two_tabs_opening_at_once_share_one_conversation(postgres):
    """Several sockets of one new session race to create its conversation: all get the same one."""
    rounds, tabs = 10, 6
    for attempt in range(rounds):
        key = f"race{attempt:028d}"
        barrier = threading.Barrier(tabs)
        opened: list[uuid.UUID] = []

        def tab(key=key, barrier=barrier, opened=opened) -> None:
            try:
                barrier.wait()
                opened.append(services.conversation_open_for_session(session_key=key).pk)
            finally:
                connection.close()

        threads = [threading.Thread(target=tab) for _ in range(tabs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(opened) == tabs, "a tab failed to open its conversation"
        assert len(set(opened)) == 1
        assert Conversation.objects.filter(session_key=key).count() == 1


def test_no_identity_is_refused():
    with pytest.raises(ApplicationError) as refused:
        services.conversation_open_for_session(session_key="")
    assert refused.value.code == "no_session"


# --- customer messages ---------------------------------------------------------------------


def test_a_resent_message_is_acknowledged_with_the_same_id_and_saved_once():
    conversation = ConversationFactory()
    message, created = services.message_create_customer(conversation=conversation, client_id="c1", text=" Hi there ")
    again, created_again = services.message_create_customer(conversation=conversation, client_id="c1", text="Hi there")
    assert (created, created_again) == (True, False)
    assert again.pk == message.pk
    assert message.body == "Hi there"
    assert conversation.messages.count() == 1
    conversation.refresh_from_db()
    assert conversation.last_message_at == message.created_at


@pytest.mark.parametrize(
    ("client_id", "text", "code"),
    [
        ("c1", "x" * 4097, "too_long"),
        ("c1", "   ", "empty"),
        ("c1", "\u200b\u2060\ufeff\u3164", "empty"),
        ("c1", "x" * 4096 + "\u0301", "too_long"),  # NFC: an accent on its own counts
        ("", "hello", "bad_frame"),
        ("c" * 65, "hello", "bad_frame"),
    ],
)
def test_bad_messages_are_refused_with_a_reason_and_not_saved(client_id, text, code):
    conversation = ConversationFactory()
    with pytest.raises(ApplicationError) as refused:
        services.message_create_customer(conversation=conversation, client_id=client_id, text=text)
    assert refused.value.code == code
    assert not conversation.messages.exists()
    # The same conversation takes a good message.
    services.message_create_customer(conversation=conversation, client_id="ok", text="x" * 4096)
    assert conversation.messages.count() == 1


def test_a_message_to_a_conversation_closed_since_it_was_loaded_is_refused():
    conversation = ConversationFactory()
    Conversation.objects.filter(pk=conversation.pk).update(status=Conversation.Status.CLOSED)  # an agent, meanwhile
    with pytest.raises(ApplicationError) as refused:
        services.message_create_customer(conversation=conversation, client_id="c", text="hello")
    assert (refused.value.code, refused.value.extra) == ("conversation_closed", {"client_id": "c"})
    assert not conversation.messages.exists()
    assert conversation.status == Conversation.Status.CLOSED


@pytest.mark.parametrize(
    ("text", "saved"),
    [
        ("Cafe\u0301", "Caf\u00e9"),
        ("\u200b\u00a0 hi \ufeff\n", "hi"),
        ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),
        ("a\u200bb", "a\u200bb"),
    ],
)
def test_message_text_is_saved_in_nfc_without_invisible_edges(text, saved):
    message, _ = services.message_create_customer(conversation=ConversationFactory(), client_id="c", text=text)
    assert message.body == saved


@pytest.mark.parametrize(
    ("text", "hands_off"),
    [
        ("Can I talk to a human please", True),
        ("I want an AGENT", True),
        ("Are there agents online?", True),
        ("Let me speak to a real person", True),
        ("Where is my order?", False),
        ("My payment agency sent a letter", False),
    ],
)
def test_keywords_hand_the_conversation_to_a_human(text, hands_off):
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text=text)
    conversation.refresh_from_db()
    expected = Conversation.Status.WAITING_FOR_AGENT if hands_off else Conversation.Status.BOT
    assert conversation.status == expected
    assert conversation.handoff_reason == ("keyword" if hands_off else "")


def test_handoff_is_idempotent_and_leaves_a_notice(django_capture_on_commit_callbacks):
    conversation = ConversationFactory()
    with django_capture_on_commit_callbacks() as callbacks:
        assert services.conversation_request_human(conversation=conversation) is True
    assert services.conversation_request_human(conversation=conversation) is False
    conversation.refresh_from_db()
    assert (conversation.status, conversation.handoff_reason) == ("waiting_for_agent", "customer_request")
    notices = conversation.messages.filter(role=Message.Role.SYSTEM)
    assert notices.count() == 1
    assert "agent" in notices.get().body
    # The notice, the handoff frame, the agents' notification, the handoff queue's new
    # entry and the waiting count.
    assert len(callbacks) == 5


@pytest.mark.django_db(transaction=True)
async def test_agents_are_notified_of_a_handoff_after_commit():
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("agents", channel)
    conversation = await database_sync_to_async(ConversationFactory)()

    def handoff_then_roll_back():
        with transaction.atomic():
            services.conversation_request_human(conversation=conversation)
            transaction.set_rollback(True)

    try:
        await database_sync_to_async(handoff_then_roll_back)()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await layer.receive(channel)  # a rolled-back handoff told nobody
        await database_sync_to_async(services.conversation_request_human)(conversation=conversation)
        async with asyncio.timeout(5):
            event = await layer.receive(channel)
        assert event == {"type": "agents.handoff", "conversation": str(conversation.pk), "reason": "customer_request"}
    finally:
        await layer.group_discard("agents", channel)


# --- bot replies ----------------------------------------------------------------------------------


def test_a_reply_is_saved_streaming_then_complete_with_its_provenance():
    version = ModelVersionFactory(number=1)
    conversation = ConversationFactory()
    question, _ = services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, prompt = start_reply(conversation)
    assert (reply.status, reply.in_reply_to_id, reply.model_version_id) == ("streaming", question.pk, version.pk)
    assert prompt[-1] == {"role": "customer", "content": "Where?"}
    finished = services.bot_reply_finish(message_id=reply.pk, done=done(), seq=5)
    finished.refresh_from_db()
    assert finished.status == Message.Status.COMPLETE
    assert finished.body == "Your order ships today."
    assert (finished.token_count, finished.latency_ms, finished.first_token_ms) == (7, 80, 12)
    assert finished.mean_logprob == -0.5
    assert finished.model_version_id == version.pk
    assert finished.generation["max_new_tokens"] == 160
    assert finished.generation["finish_reason"] == "stop"


def test_a_reply_the_policy_withheld_fails_says_why_and_calls_a_human():
    # The pipeline shows nothing of a model reply without words (emoji only) that the policy
    # handed off; the saved reply says so rather than "the model produced no text".
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="\U0001f600" * 40)
    reply, _ = start_reply(conversation)
    reason = "The model's reply has no words and no past exchange is close."
    withheld = dataclasses.replace(done(text=""), handoff=True, policy={"source": "handoff", "reason": reason})
    finished = services.bot_reply_finish(message_id=reply.pk, done=withheld, seq=0)
    assert (finished.status, finished.body) == (Message.Status.FAILED, "")
    assert finished.generation["error"] == f"The reply was not shown and a human was called: {reason}"
    conversation.refresh_from_db()
    assert conversation.status == Conversation.Status.WAITING_FOR_AGENT


def test_a_message_is_answered_once():
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    age_heartbeat(reply, 10)
    assert start_reply(conversation, live_ids={reply.pk}) is None  # still streaming
    services.bot_reply_finish(message_id=reply.pk, done=done(), seq=1)
    assert start_reply(conversation) is None  # answered
    services.message_create_customer(conversation=conversation, client_id="c2", text="And when?")
    assert start_reply(conversation) is not None


def test_a_reply_cut_off_by_a_shutdown_is_kept_and_its_question_answered_again():
    conversation = ConversationFactory()
    question, _ = services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    cut = services.bot_reply_finish(message_id=reply.pk, done=done(text="Your ord", reason="shutdown"), seq=2)
    assert (cut.status, cut.body) == (Message.Status.FAILED, "Your ord")
    conversation.refresh_from_db()
    assert conversation.status == Conversation.Status.BOT  # a restart is no reason to call a human
    again, _ = start_reply(conversation)
    assert again.in_reply_to_id == question.pk
    services.bot_reply_fail(message_id=again.pk, error="The model failed.")
    assert start_reply(conversation) is None  # any other failure does answer it (a human takes over)


def test_the_startup_sweep_fails_replies_whose_process_is_gone_or_silent_only():
    def streaming(owner: str, heartbeat_age_s: float) -> Message:
        conversation = ConversationFactory()
        services.message_create_customer(conversation=conversation, client_id="c", text="Where?")
        reply, _ = services.bot_reply_start(conversation=conversation, model_label="v1", params={}, owner=owner)
        age_heartbeat(reply, heartbeat_age_s)
        return reply

    gone = streaming("host:1:a:ns", 1)
    silent = streaming("elsewhere:2:b:ns2", services.REPLY_STALE_AFTER_S + 1)
    alive = streaming("elsewhere:3:c:ns2", 1)
    swept = services.bot_replies_sweep(owner=OWNER, owner_gone=lambda owner: owner == "host:1:a:ns")
    assert {m.pk for m in swept} == {gone.pk, silent.pk}
    alive.refresh_from_db()
    assert alive.status == Message.Status.STREAMING


def test_the_startup_sweep_spares_this_processs_own_live_replies():
    """The sweep runs again while the server serves: a reply it is writing now is not a dead one."""
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c", text="Where?")
    live, _ = services.bot_reply_start(conversation=conversation, model_label="v1", params={}, owner=OWNER)
    other = ConversationFactory()
    services.message_create_customer(conversation=other, client_id="c", text="Where?")
    dead, _ = services.bot_reply_start(conversation=other, model_label="v1", params={}, owner=OWNER)
    for reply in (live, dead):
        age_heartbeat(reply, services.REPLY_REGISTER_GRACE_S + 3)  # started a while ago, heartbeat fresh
    swept = services.bot_replies_sweep(owner=OWNER, owner_gone=lambda owner: False, live_ids={live.pk: object()})
    assert [m.pk for m in swept] == [dead.pk]
    live.refresh_from_db()
    assert live.status == Message.Status.STREAMING


def test_the_bot_does_not_answer_once_handed_off():
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    services.conversation_request_human(conversation=conversation)
    assert start_reply(conversation) is None


def test_a_low_confidence_reply_is_kept_and_hands_off(settings):
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -2.0
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_finish(message_id=reply.pk, done=done(logprob=-3.1), seq=1)
    reply.refresh_from_db()
    conversation.refresh_from_db()
    assert reply.status == Message.Status.COMPLETE
    assert (conversation.status, conversation.handoff_reason) == ("waiting_for_agent", "low_confidence")


def test_a_retrieved_answer_sent_for_unsure_model_words_does_not_hand_off(settings):
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -2.0
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    grounding = [{"origin": "ticket:bitext:7", "score": 0.81, "intent": "track_order"}]
    policy = {
        "source": "retrieved",
        "reason": "The model is unsure",
        "origin": "ticket:bitext:7",
        "intent": "track_order",
    }
    retrieved = dataclasses.replace(
        done(logprob=-3.1), source="retrieved", source_origin="ticket:bitext:7", policy=policy, grounding=grounding
    )
    services.bot_reply_finish(message_id=reply.pk, done=retrieved, seq=1)
    reply.refresh_from_db()
    conversation.refresh_from_db()
    assert conversation.status == Conversation.Status.BOT
    assert reply.grounding == grounding
    assert (reply.generation["source"], reply.generation["source_origin"]) == ("retrieved", "ticket:bitext:7")
    assert reply.generation["intent"] == "track_order"


def test_the_reply_policys_handoff_hands_off_a_confident_reply(settings):
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -2.0
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_finish(message_id=reply.pk, done=dataclasses.replace(done(logprob=-1.2), handoff=True), seq=1)
    conversation.refresh_from_db()
    assert (conversation.status, conversation.handoff_reason) == ("waiting_for_agent", "low_confidence")


def test_a_cut_reply_is_marked(settings):
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_finish(message_id=reply.pk, done=dataclasses.replace(done(), cut_reason="sentence"), seq=1)
    reply.refresh_from_db()
    assert (reply.status, reply.generation["cut_reason"]) == (Message.Status.COMPLETE, "sentence")


def test_a_confident_reply_does_not_hand_off(settings):
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -2.0
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_finish(message_id=reply.pk, done=done(logprob=-1.2), seq=1)
    conversation.refresh_from_db()
    assert conversation.status == Conversation.Status.BOT


@pytest.mark.parametrize(("text", "reason"), [("", "stop"), ("Half a", "timeout"), ("Half a", "error")])
def test_an_empty_or_broken_reply_is_failed_and_hands_off(text, reason):
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_finish(message_id=reply.pk, done=done(text=text, reason=reason), seq=1)
    reply.refresh_from_db()
    conversation.refresh_from_db()
    assert reply.status == Message.Status.FAILED
    assert reply.body == text
    assert conversation.handoff_reason == "error"


def test_a_dead_reply_is_flagged_failed_and_a_live_one_is_not():
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    services.bot_reply_heartbeat(message_id=reply.pk, body="Your ord", seq=2)
    # Another process's reply with a fresh heartbeat is alive.
    assert services.bot_replies_recover(conversation=conversation, owner="elsewhere", live_ids=()) == []
    # This process's reply is alive while it is in the live set...
    assert services.bot_replies_recover(conversation=conversation, owner=OWNER, live_ids={reply.pk}) == []
    # ...and another process's reply is dead once its heartbeat is stale.
    age_heartbeat(reply, services.REPLY_STALE_AFTER_S + 1)
    failed = services.bot_replies_recover(conversation=conversation, owner="elsewhere", live_ids=())
    assert [m.pk for m in failed] == [reply.pk]
    reply.refresh_from_db()
    assert (reply.status, reply.body) == ("failed", "Your ord")
    assert reply.generation["finish_reason"] == "interrupted"


def test_this_process_flags_its_own_reply_that_stopped_running():
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    # Just started: registering it as live may not have happened yet.
    assert services.bot_replies_recover(conversation=conversation, owner=OWNER, live_ids=()) == []
    age_heartbeat(reply, services.REPLY_REGISTER_GRACE_S + 0.5)
    messages = services.conversation_resume(conversation=conversation, after_id=0, owner=OWNER, live_ids=set())
    assert [(m.role, m.status) for m in messages][:2] == [("customer", "complete"), ("bot", "failed")]


def test_resume_returns_messages_after_an_id_in_order():
    conversation = ConversationFactory()
    ids = [
        services.message_create_customer(conversation=conversation, client_id=f"c{i}", text=f"m{i}")[0].pk
        for i in range(4)
    ]
    got = services.conversation_resume(conversation=conversation, after_id=ids[1], owner=OWNER, live_ids=())
    assert [m.pk for m in got] == ids[2:]
    with pytest.raises(ApplicationError):
        services.conversation_resume(conversation=conversation, after_id="x", owner=OWNER, live_ids=())


def test_csat_is_recorded_on_a_finished_bot_reply_only():
    conversation = ConversationFactory()
    question, _ = services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    reply, _ = start_reply(conversation)
    with pytest.raises(ApplicationError):
        services.csat_record(conversation=conversation, message_id=reply.pk, helpful=True)  # still streaming
    services.bot_reply_finish(message_id=reply.pk, done=done(), seq=1)
    services.csat_record(conversation=conversation, message_id=reply.pk, helpful=False)
    reply.refresh_from_db()
    assert reply.helpful is False
    assert reply.helpful_at is not None
    with pytest.raises(ApplicationError):
        services.csat_record(conversation=conversation, message_id=question.pk, helpful=True)
    with pytest.raises(ApplicationError):
        services.csat_record(conversation=ConversationFactory(), message_id=reply.pk, helpful=True)


def test_the_no_model_notice_is_not_repeated_until_someone_answers():
    conversation = ConversationFactory()
    services.message_create_customer(conversation=conversation, client_id="c1", text="Where?")
    assert services.conversation_notice_no_model(conversation=conversation) is not None
    services.message_create_customer(conversation=conversation, client_id="c2", text="Hello?")
    assert services.conversation_notice_no_model(conversation=conversation) is None


# --- the prompt -----------------------------------------------------------------------------


def test_the_prompt_has_the_profile_and_the_answered_history():
    BotProfile.objects.create(company_name="Globex", system_prompt="You help {company}.", policy_text="No refunds.")
    conversation = ConversationFactory()
    MessageFactory(conversation=conversation, role="customer", body="Hi")
    MessageFactory(conversation=conversation, role="bot", body="Hello!")
    MessageFactory(conversation=conversation, role="bot", body="cut", status="failed")
    MessageFactory(conversation=conversation, role="system", body="An agent will join.")
    MessageFactory(conversation=conversation, role="agent", body="I am Sam.")
    last = MessageFactory(conversation=conversation, role="customer", body="Refund?")
    MessageFactory(conversation=conversation, role="customer", body="later")
    prompt = prompt_messages(conversation=conversation, upto=last)
    assert prompt[0]["role"] == "system"
    assert prompt[0]["content"].startswith("You help Globex.")
    assert "No refunds." in prompt[0]["content"]
    assert prompt[1:] == [
        {"role": "customer", "content": "Hi"},
        {"role": "agent", "content": "Hello!"},
        {"role": "agent", "content": "I am Sam."},
        {"role": "customer", "content": "Refund?"},
    ]
    assert len(prompt_messages(conversation=conversation, upto=last, max_turns=2)) == 3
    assert list(messages_after(conversation=conversation, after_id=last.pk))[0].body == "later"


def test_the_conversations_language_is_the_newest_stored_label_that_tells():
    conversation = ConversationFactory()
    services.message_create_customer(
        conversation=conversation, client_id="c-1", text="Bonjour, où en est ma commande ? Elle n'est pas arrivée."
    )
    number, _ = services.message_create_customer(conversation=conversation, client_id="c-2", text="12345678")
    later, _ = services.message_create_customer(
        conversation=conversation, client_id="c-3", text="Hola, quiero cambiar la dirección de entrega de mi pedido."
    )

    assert number.language == "und"  # too short to tell: the message before decides
    assert conversation_language(conversation=conversation, upto=number) == "fr"
    assert conversation_language(conversation=conversation, upto=later) == "es"


def test_a_conversation_without_stored_labels_has_no_language_yet():
    # Messages saved before labelling: the reply pipeline detects the language from the prompt instead.
    message = MessageFactory(body="Bonjour, où en est ma commande ?")

    assert message.language == ""
    assert conversation_language(conversation=message.conversation, upto=message) == ""
