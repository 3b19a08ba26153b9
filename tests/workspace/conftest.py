"""Fixtures of the workspace tests: signed-in agents and model admins, and a queue with a reply in it."""

from __future__ import annotations

import pytest

from conversations.review import services as review
from finetune.serving.runtime import model_listener_stop
from supportbot.roles import MODEL_ADMINS, SUPPORT_AGENTS

# The chat's served-model fixtures (a tiny trained model, an active version, none).
from tests.conversations.conftest import active_model, no_model, tiny_model_dir  # noqa: F401
from tests.factories import ModelVersionFactory, bot_reply, staff_user


@pytest.fixture(autouse=True)
def _queue_settings(settings):
    # Queues fill only through what a test does.
    settings.SUPPORTBOT_REVIEW_SAMPLE_SHARE = 0.0
    settings.SUPPORTBOT_DOUBLE_REVIEW_SHARE = 0.0
    settings.SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD = -1000.0
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = -1000.0


@pytest.fixture
def agent(db):
    return staff_user(SUPPORT_AGENTS, "sam", first_name="Sam")


@pytest.fixture
def other_agent(db):
    return staff_user(SUPPORT_AGENTS, "alex", first_name="Alex")


@pytest.fixture
def model_admin(db):
    return staff_user(MODEL_ADMINS, "morgan", first_name="Morgan")


@pytest.fixture
def agent_client(client, agent):
    client.force_login(agent)
    return client


@pytest.fixture
def queued_reply(db):
    """A bot reply in the "flagged" queue, with what a reviewer sees about it."""
    version = ModelVersionFactory(number=7)
    reply = bot_reply(
        question="Where is my parcel?",
        body="Your parcel ships today.",
        model_version=version,
        mean_logprob=-0.5,
        latency_ms=321,
        first_token_ms=45,
        token_count=6,
        generation={
            "model_label": "v7",
            "finish_reason": "stop",
            "grounding": {
                "exchanges": [
                    {
                        "question": "Parcel late?",
                        "answer": "Track it in your account.",
                        "score": 0.83,
                        "origin": "ticket:bitext:42",
                        "intent": "track_order",
                    }
                ]
            },
        },
    )
    item, _ = review.queue_item_add(message=reply, source="flagged", note="Looks off")
    return item


@pytest.fixture(autouse=True)
async def _stop_model_listener():
    """The engine's model listener lives on a test's event loop; stop it with the loop (see test_consumers)."""
    yield
    await model_listener_stop()
