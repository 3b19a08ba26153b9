"""Grounded replies through the whole chat: retrieval, the reply policy, slots filled, what the bot leaned on.

A model version that carries a retrieval index (``retrieval/`` beside its weights, as
training writes it) grounds every reply on it. The tiny chat model is the one the other
chat tests serve; its version directory gets an index of past exchanges and a
``train_config.json`` whose reply policy is set so the test knows which way it decides
(every model reply "unsure": a close past answer goes out; or never unsure).
"""

from __future__ import annotations

import json
import shutil

import pytest
from channels.db import database_sync_to_async

from conversations import replies, services
from conversations.models import BotProfile, Conversation, Message
from finetune.ml.retrieval import Exchange, RetrievalIndex
from finetune.models import ModelVersion
from finetune.serving.runtime import engine_reset, model_listener_stop
from tests.conversations.conftest import new_session_key, open_chat, receive_until, token_for
from tests.factories import ModelVersionFactory

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = "+44 20 7946 0958"
PAST = [
    Exchange(
        "where is my order, it has not arrived",
        "Your order is on its way. "
        "Call {{Customer Support Phone Number}} if order {{Order Number}} is not there by Friday.",
        "track_order",
        "ticket:test:1",
    ),
    Exchange(
        "parcel delivery is late, tracking shows nothing",
        "Your order is on its way. Please allow two more days before we open a search for it.",
        "track_order",
        "ticket:test:2",
    ),
    Exchange("how do i reset my password", "Use the Forgot password link on the login page.", "reset", "ticket:test:3"),
    Exchange("i want my money back", "Refunds are paid within five business days.", "refund", "ticket:test:4"),
]


@pytest.fixture(autouse=True)
async def _stop_model_listener():
    yield
    await model_listener_stop()


def grounded_version(tmp_path, tiny_model_dir, past=PAST, **policy) -> ModelVersion:
    """An active version whose run directory holds the tiny model, an index of ``past`` and its policy."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "merged")
    RetrievalIndex.build(past).save(run / "retrieval")
    (run / "train_config.json").write_text(json.dumps({"reply_policy": {"mode": "fallback", **policy}}))
    engine_reset()
    return ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(run / "merged"), adapter_path=str(run / "merged")
    )


async def ask(text: str) -> tuple[list[dict], Message]:
    comm, _ = await open_chat(token_for(await database_sync_to_async(new_session_key)()))
    await comm.send_json_to({"type": "message", "client_id": "c-1", "text": text})
    frames = await receive_until(comm, lambda f: f["type"] == "reply_done", timeout=60)
    await comm.disconnect()
    reply = await database_sync_to_async(Message.objects.get)(pk=frames[-1]["id"])
    return frames, reply


@pytest.fixture
def profile(transactional_db):
    return BotProfile.objects.create(company_name="Acme", support_phone=PHONE)


async def test_an_unsure_reply_is_replaced_by_the_closest_past_answer_filled_in(
    tmp_path, tiny_model_dir, profile, settings
):
    # Every model reply counts as unsure (mean log-probability < 0), and an unsure model
    # reply would hand the customer to a person: a past answer sent instead does not.
    await database_sync_to_async(grounded_version)(tmp_path, tiny_model_dir, fallback_logprob=0.0, fallback_score=0.2)
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -0.0001
    try:
        frames, reply = await ask("Where is my order 12345678? It has not arrived.")
    finally:
        engine_reset()
    streamed = "".join(f["delta"] for f in frames if f["type"] == "token")
    expected = f"Your order is on its way. Call {PHONE} if order 12345678 is not there by Friday."
    assert reply.body == expected
    assert streamed.strip() == expected  # the customer never saw a slot, nor the model's own words
    assert (reply.generation["source"], reply.generation["source_origin"]) == ("retrieved", "ticket:test:1")
    assert "unsure" in reply.generation["policy"]["reason"]
    # What the bot leaned on: the neighbours shown to the model, closest first.
    assert [g["origin"] for g in reply.grounding][0] == "ticket:test:1"
    assert {g["intent"] for g in reply.grounding} == {"track_order"}
    assert all(0 < g["score"] <= 1 for g in reply.grounding)
    conversation = await database_sync_to_async(Conversation.objects.get)()
    assert conversation.status == Conversation.Status.BOT


FRENCH_PAST = [
    Exchange(
        "où est ma commande, elle n'est pas arrivée",
        "Votre commande est en route. Appelez {{Customer Support Phone Number}} ou suivez la commande "
        "{{Order Number}} sur {{Website URL}}.",
        "track_order",
        "ticket:test:fr",
    ),
    *PAST,
]


async def test_a_french_conversation_gets_its_slots_filled_in_french(tmp_path, tiny_model_dir, profile, settings):
    # As above, a past answer goes out; it holds a fact the profile has (the phone), one it
    # lacks (the website) and an order number the customer did not give.
    await database_sync_to_async(grounded_version)(
        tmp_path, tiny_model_dir, past=FRENCH_PAST, fallback_logprob=0.0, fallback_score=0.2
    )
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -0.0001
    try:
        frames, reply = await ask("Où est ma commande ? Elle n'est pas arrivée.")
    finally:
        engine_reset()
    question = await database_sync_to_async(Message.objects.get)(role=Message.Role.CUSTOMER)
    streamed = "".join(f["delta"] for f in frames if f["type"] == "token")
    # Not "suivez la commande your order number sur our website".
    expected = f"Votre commande est en route. Appelez {PHONE} ou suivez votre commande sur notre site web."
    assert question.language == "fr"  # labelled when saved
    assert reply.generation["source_origin"] == "ticket:test:fr"
    assert reply.body == expected
    assert streamed.strip() == expected


async def test_the_reply_follows_the_language_stored_with_the_customers_message(
    tmp_path, tiny_model_dir, profile, settings
):
    # A label set by hand, unlike the message's words, shows that the stored label (not a
    # new detection) chooses the words: the runner passes it with the request. The past
    # answer is too short before its slot to tell its own language (which would decide).
    short_past = [
        Exchange("où est ma commande, elle n'est pas arrivée", "Voir {{Website URL}}.", "track_order", "ticket:t:fr"),
        *PAST,
    ]
    await database_sync_to_async(grounded_version)(
        tmp_path, tiny_model_dir, past=short_past, fallback_logprob=0.0, fallback_score=0.2
    )
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -0.0001

    def customer_message_labelled_german() -> Conversation:
        conversation = Conversation.objects.create(session_key=new_session_key())
        message, _ = services.message_create_customer(
            conversation=conversation, client_id="c-1", text="Où est ma commande ? Elle n'est pas arrivée."
        )
        Message.objects.filter(pk=message.pk).update(language="de")
        return conversation

    conversation = await database_sync_to_async(customer_message_labelled_german)()
    sent = []

    async def send(frame):
        sent.append(frame)

    try:
        replies.reply_request(conversation_id=str(conversation.pk), send=send, origin="test")
        await replies.replies_wait(60)
    finally:
        engine_reset()
    reply = await database_sync_to_async(Message.objects.get)(role=Message.Role.BOT)
    assert reply.body == "Voir unsere Website."


async def test_a_sure_reply_is_the_models_own_primed_with_the_closest_answer(tmp_path, tiny_model_dir, profile):
    await database_sync_to_async(grounded_version)(tmp_path, tiny_model_dir, fallback_logprob=-1000.0)
    try:
        frames, reply = await ask("Where is my order 12345678? It has not arrived.")
    finally:
        engine_reset()
    assert reply.generation["source"] == "model"
    assert reply.generation["source_origin"] == ""
    # The reply starts with the closest answer's first sentence (the tiny model may end it there).
    assert reply.body.startswith("Your order is on its way.")
    assert reply.grounding
    assert reply.grounding[0]["origin"] == "ticket:test:1"
    assert "{{" not in reply.body
    assert "[" not in "".join(f["delta"] for f in frames if f["type"] == "token")


async def test_a_version_without_an_index_is_served_as_before(active_model, transactional_db):
    try:
        _, reply = await ask("Where is my order?")
    finally:
        engine_reset()
    assert reply.status == Message.Status.COMPLETE
    assert reply.grounding == []
    assert reply.generation["source"] == "model"
    assert "policy" not in reply.generation
