"""A chat server stopped (SIGTERM) or killed mid-reply, on real daphne processes with a real websocket client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone
from websockets.exceptions import ConnectionClosed

from conversations import replies
from conversations.models import Message
from tests.conversations.test_real_server import SERVER_ENV, chat_token, is_done, open_socket, until
from tests.factories import ConversationFactory, MessageFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SLOW_APP = "tests.conversations.slow_asgi:application"


async def first_token(ws) -> list[dict]:
    return await until(ws, lambda f: f["type"] == "token")


async def read_all(ws, into: list[dict]) -> None:
    """Frames until the connection ends (raises ``ConnectionClosed``)."""
    while True:
        into.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))


async def wait_for_log(process, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log_path.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{process.log_path.read_text()[-3000:]}"
        await asyncio.sleep(0.2)


async def test_sigterm_mid_reply_cuts_it_off_closes_with_1012_and_the_next_server_answers(daphne_factory, served_model):
    base = daphne_factory(application=SLOW_APP, SUPPORTBOT_SHUTDOWN_GRACE_S="1", **SERVER_ENV)
    process = daphne_factory.processes[base]
    token = await asyncio.to_thread(chat_token, base)
    ws, _ = await open_socket(base, token)
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    frames = await first_token(ws)
    question = next(f for f in frames if f.get("client_id") == "c-1")

    process.send_signal(signal.SIGTERM)
    await wait_for_log(process, "stopped accepting connections")
    with pytest.raises(ConnectionRefusedError):  # no new connections while it drains
        socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=5).close()
    rest = []
    with pytest.raises(ConnectionClosed) as closed:
        await read_all(ws, rest)
    assert closed.value.rcvd is not None, "no close frame"  # not a dropped connection (1006)
    assert closed.value.rcvd.code == 1012
    done = [f for f in rest if f["type"] == "reply_done"]
    assert len(done) == 1, rest
    assert (done[0]["status"], done[0]["finish_reason"]) == ("failed", "shutdown")
    await asyncio.to_thread(process.wait, 60)

    reply = await database_sync_to_async(Message.objects.get)(pk=done[0]["id"])
    assert reply.status == Message.Status.FAILED  # never left "streaming"
    assert reply.body == done[0]["body"]
    assert reply.body  # the text written before the cut is kept

    # The widget reconnects (here to a new server) and resumes: the question is answered again.
    base = daphne_factory(**SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base, token))
    await ws.send(json.dumps({"type": "resume", "after": question["id"]}))
    again = (await until(ws, lambda f: is_done(f) and f["id"] != reply.pk))[-1]
    assert again["status"] == "complete"
    answer = await database_sync_to_async(Message.objects.get)(pk=again["id"])
    assert answer.in_reply_to_id == question["id"]
    await ws.close()


def ended_process_id() -> int:
    ended = subprocess.Popen(["true"])  # noqa: S607 - any short-lived process: its PID is now free
    ended.wait()
    return ended.pid


async def test_a_new_server_fails_the_replies_of_dead_processes_only(daphne_factory, served_model):
    # A server killed mid-reply (kill -9: no shutdown steps at all).
    base = daphne_factory(application=SLOW_APP, **SERVER_ENV)
    ws, _ = await open_socket(base, await asyncio.to_thread(chat_token, base))
    await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
    killed_reply = next(f for f in await first_token(ws) if f["type"] == "message" and f["role"] == "bot")
    daphne_factory.processes[base].kill()
    daphne_factory.processes[base].wait()

    # Replies other processes left: whose heartbeat is fresh (for an hour yet) unless said otherwise.
    namespace = replies.PID_NAMESPACE
    host = socket.gethostname()
    fresh = (timezone.now() + timedelta(hours=1)).isoformat()
    rows = {
        "ended here": (f"{host}:{ended_process_id()}:dead:{namespace}", fresh),
        "running here": (f"{host}:{os.getpid()}:alive:{namespace}", fresh),  # this test process
        "another machine": ("elsewhere:1234:alive:0123456789ab", fresh),
        "another machine, silent": ("elsewhere:1234:alive:0123456789ab", "2020-01-01T00:00:00+00:00"),
    }

    def leave_streaming():
        made = {}
        for name, (owner, heartbeat) in rows.items():
            question = MessageFactory(conversation=ConversationFactory(), body=name)
            made[name] = MessageFactory(
                conversation=question.conversation,
                role=Message.Role.BOT,
                status=Message.Status.STREAMING,
                in_reply_to=question,
                body="Half a repl",
                generation={"owner": owner, "heartbeat": heartbeat, "seq": 3},
            ).pk
        return made

    made = await database_sync_to_async(leave_streaming)()
    second = daphne_factory(**SERVER_ENV)
    await wait_for_log(daphne_factory.processes[second], "marked failed")

    def statuses():
        return dict(Message.objects.filter(role=Message.Role.BOT).values_list("pk", "status"))

    now = await database_sync_to_async(statuses)()
    assert now[killed_reply["id"]] == Message.Status.FAILED
    assert now[made["ended here"]] == Message.Status.FAILED
    assert now[made["another machine, silent"]] == Message.Status.FAILED
    assert now[made["running here"]] == Message.Status.STREAMING  # another live server's: left alone
    assert now[made["another machine"]] == Message.Status.STREAMING


def test_only_an_ended_process_in_this_pid_namespace_counts_as_gone():
    namespace, host = replies.PID_NAMESPACE, socket.gethostname()
    assert replies.process_gone(f"{host}:{ended_process_id()}:x:{namespace}")
    assert not replies.process_gone(replies.PROCESS_ID)  # this process
    assert not replies.process_gone(f"{host}:{os.getppid()}:x:{namespace}")  # alive
    assert not replies.process_gone(f"{host}:{ended_process_id()}:x:another-namespace")  # cannot tell: no
    assert not replies.process_gone(f"{host}:{ended_process_id()}:x")  # an id written before namespaces
    assert not replies.process_gone("dead-host:1:x")
