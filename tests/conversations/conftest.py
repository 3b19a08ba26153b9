"""Fixtures of the chat tests: a tiny served model, customer sessions and websocket helpers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore
from django.test import override_settings

from conversations.models import BotProfile
from conversations.selectors import system_prompt_for
from conversations.tokens import chat_token_mint
from finetune.ml.tiny import build_tiny_causal_lm
from finetune.models import ModelVersion
from finetune.serving.runtime import engine_reset
from supportbot.roles import MODEL_ADMINS, SUPPORT_AGENTS
from tests.factories import ModelVersionFactory, staff_user

# The low-confidence handoff is switched off here and switched on only by the test of
# that rule, so the other tests read every reply of the tiny model as an ordinary one.
LOW_CONFIDENCE_OFF = -1000.0

# What the tiny model is trained to say, in the chat's own prompt format: replies of
# several words, so they stream in several pieces through the safety filter (which
# sends whole words only) as a real model's do.
EXCHANGES = [
    ("Where is my order?", "Your order has shipped and will arrive in two days, tracking is in your account."),
    ("How do I reset my password?", "Use the Forgot password link on the login page and follow the e-mail we send."),
    ("I want a refund.", "I am sorry to hear that. Refunds are paid back within five business days."),
    ("Can I change my address?", "Yes, open Settings, then Addresses, and edit the delivery address there."),
]


@pytest.fixture(autouse=True)
def _chat_settings(settings):
    settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = LOW_CONFIDENCE_OFF
    settings.SUPPORTBOT_RATE_LIMIT = 50
    # Queues fill only through the rule a test is about: no random sample, no second
    # reviews, no low-confidence entries unless a test turns them on.
    settings.SUPPORTBOT_REVIEW_SAMPLE_SHARE = 0.0
    settings.SUPPORTBOT_DOUBLE_REVIEW_SHARE = 0.0
    settings.SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD = LOW_CONFIDENCE_OFF


@pytest.fixture
def agent(db):
    return staff_user(SUPPORT_AGENTS, "sam", first_name="Sam")


@pytest.fixture
def other_agent(db):
    return staff_user(SUPPORT_AGENTS, "alex", first_name="Alex")


@pytest.fixture
def model_admin(db):
    return staff_user(MODEL_ADMINS, "morgan", first_name="Morgan")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    system = system_prompt_for(BotProfile())
    corpus = [f"System: {system}\nCustomer: {q}\nAgent: {a}" for q, a in EXCHANGES]
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-chat-model"), corpus, overfit_steps=150)


@pytest.fixture
def active_model(tiny_model_dir) -> ModelVersion:
    """An active model version served by this process's engine (loaded on first use)."""
    engine_reset()
    version = ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(tiny_model_dir), adapter_path=str(tiny_model_dir)
    )
    yield version
    engine_reset()


@pytest.fixture
def served_model(tiny_model_dir, transactional_db) -> ModelVersion:
    """An active model version, committed, so a daphne process started by the test serves it."""
    return ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(tiny_model_dir), adapter_path=str(tiny_model_dir)
    )


@pytest.fixture
def no_model():
    engine_reset()
    yield
    engine_reset()


def new_session_key() -> str:
    store = SessionStore()
    store["supportbot_chat"] = True
    store.create()
    return store.session_key


@pytest.fixture
def session_key(db) -> str:
    return new_session_key()


def communicator(token: str | None, *, path: str = "/ws/chat/", origin: str = "http://testserver", query: str = ""):
    """A WebsocketCommunicator on the real ASGI stack (Origin check, sessions, routing)."""
    with override_settings(SUPPORTBOT_PRELOAD_MODEL=False):  # the tests load models themselves
        from supportbot.asgi import application

    params = [f"token={token}"] if token else []
    if query:
        params.append(query)
    url = path + ("?" + "&".join(params) if params else "")
    headers = [(b"origin", origin.encode())] if origin else []
    return WebsocketCommunicator(application, url, headers=headers)


def token_for(session_key: str) -> str:
    return chat_token_mint(session_key=session_key)


async def receive_until(comm: WebsocketCommunicator, predicate, *, timeout: float = 20.0) -> list[dict]:
    """Frames received until one matches ``predicate`` (included); fails after ``timeout`` seconds."""
    frames: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"No matching frame within {timeout} s; got {frames}")
        frame = await comm.receive_json_from(timeout=remaining)
        frames.append(frame)
        if predicate(frame):
            return frames


async def open_chat(token: str, **kwargs) -> tuple[WebsocketCommunicator, dict]:
    comm = communicator(token, **kwargs)
    connected, code = await comm.connect(timeout=10)
    assert connected, code
    hello = await comm.receive_json_from(timeout=10)
    assert hello["type"] == "conversation", hello
    return comm, hello


async def start_conversation(comm: WebsocketCommunicator, text: str, *, client_id: str = "c-start") -> str:
    """Send the customer's first message, which starts the conversation; return its id.

    The socket opens without one (``id`` null) and says which when the first message made it.
    """
    await comm.send_json_to({"type": "message", "client_id": client_id, "text": text})
    frames = await receive_until(comm, lambda f: f["type"] == "conversation" and f["id"])
    return frames[-1]["id"]
