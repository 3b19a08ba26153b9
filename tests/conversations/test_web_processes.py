"""Several web processes behind one proxy: real daphne processes sharing the Redis channel layer.

Production runs several daphne processes (docs/deploy.md); a customer's tab and an
agent's workspace may land on different ones. These tests start two, open real
websockets on each, and check that what happens on one reaches the other through
Redis: the agent's socket on one process sees a customer of the other, both ways of
the conversation, and a promotion reaches every process's model listener.
(The same customer's tabs on two processes: test_real_server.py.)
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from websockets.asyncio.client import connect

from conversations.services import conversation_take_over
from finetune.models import ModelVersion
from finetune.services.model_versions import model_version_promote
from tests.conversations.test_real_server import SERVER_ENV, chat_token, is_done, open_socket, served_here, until
from tests.factories import ModelVersionFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def _agent_socket(base: str, agent, path: str = "/ws/agent/"):
    cookie = await database_sync_to_async(_session_cookie)(agent)
    url = base.replace("http://", "ws://") + path
    ws = await connect(url, origin=base, additional_headers={"Cookie": f"sessionid={cookie}"}, proxy=None)
    return ws


async def test_an_agent_on_one_process_works_a_conversation_held_on_another(
    daphne_factory, served_model, redis_url, agent
):
    customer_side, agent_side = daphne_factory(**SERVER_ENV), daphne_factory(**SERVER_ENV)
    assert customer_side != agent_side

    desk = await _agent_socket(agent_side, agent)
    hello = json.loads(await asyncio.wait_for(desk.recv(), 15))
    assert (hello["type"], hello["waiting"]) == ("hello", 0)

    # A customer on the other process asks for a person: the agent's desk hears it.
    token = await asyncio.to_thread(chat_token, customer_side)
    customer, _ = await open_socket(customer_side, token)
    await customer.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    started = (await until(customer, is_done))[0]
    await customer.send(json.dumps({"type": "request_human"}))
    seen = []
    for wanted in ("handoff_requested", "waiting"):
        if not any(f["type"] == wanted for f in seen):
            seen += await until(desk, lambda f, wanted=wanted: f["type"] == wanted, timeout=60)
    assert [f["conversation"] for f in seen if f["type"] == "handoff_requested"] == [started["id"]]
    assert [f["count"] for f in seen if f["type"] == "waiting"][-1] == 1

    # The agent opens that conversation on their process; the customer writes on theirs.
    room = await _agent_socket(agent_side, agent, f"/ws/agent/conversations/{started['id']}/")
    await customer.send(json.dumps({"type": "message", "client_id": "c-2", "text": "Still there?"}))
    heard = await until(room, lambda f: f.get("type") == "message" and f.get("body") == "Still there?", timeout=60)
    assert heard[-1]["role"] == "customer"

    # The agent takes it over and answers from their process: the customer's socket gets it.
    await database_sync_to_async(conversation_take_over)(conversation_id=started["id"], agent=agent)
    await until(customer, lambda f: f["type"] == "handoff" and f["status"] == "with_agent", timeout=60)
    await room.send(json.dumps({"type": "message", "client_id": "a-1", "text": "Hello, Sam here."}))
    reply = await until(customer, lambda f: f.get("type") == "message" and f.get("role") == "agent", timeout=60)
    assert reply[-1]["body"] == "Hello, Sam here."

    for ws in (customer, room, desk):
        await ws.close()


def _wait_serving(base: str, label: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := served_here(base))["serving"] != label:
        assert time.monotonic() < deadline, f"{base} still serves {status} instead of {label}"
        time.sleep(0.5)
    return status


async def test_a_promotion_reaches_every_web_process_through_redis(daphne_factory, served_model, redis_url):
    servers = [daphne_factory(**SERVER_ENV), daphne_factory(**SERVER_ENV)]
    # A chat on each process starts its model listener (the first reply does, see runtime.get_engine).
    for base in servers:
        token = await asyncio.to_thread(chat_token, base)
        ws, _ = await open_socket(base, token)
        await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
        done = (await until(ws, is_done))[-1]
        assert done["model_version"] == served_model.label
        await ws.close()

    candidate = await database_sync_to_async(ModelVersionFactory)(
        status=ModelVersion.Status.CANDIDATE,
        merged_path=served_model.merged_path,
        adapter_path=served_model.adapter_path,
    )
    # Sent from this process (as the admin's would be) through the Redis layer to both servers.
    await database_sync_to_async(model_version_promote)(version=candidate, reason="Cluster test")
    for base in servers:
        await asyncio.to_thread(_wait_serving, base, candidate.label)
        # The event, not a later check of the database, made the switch.
        log = daphne_factory.processes[base].log_path.read_text()
        assert f"Model changed to {candidate.label}: reloading" in log
