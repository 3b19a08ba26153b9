"""The chat server's start and stop: sweep replies dead processes left, drain on SIGTERM.

``supportbot/asgi.py`` calls ``install_server_hooks()``. Under daphne (a Twisted reactor
over the asyncio loop) it registers:

- **at start** (``reactor.callWhenRunning``): the steps ``asgi.py`` passes (the model
  listener and watcher), and every reply still ``streaming`` whose writer
  is gone is marked ``failed`` (``services.bot_replies_sweep``). Several daphne processes
  may share the database, so a reply is swept only when its process has surely ended
  (same machine and PID namespace, PID free: ``replies.process_gone``) or its heartbeat
  is stale; replies of live servers are left alone. A predecessor this process cannot
  see (a restarted container has a new PID namespace) is judged by its heartbeat, so
  the sweep runs once more when any heartbeat it saw would have gone stale.
- **at stop** (SIGTERM or SIGINT; a Twisted "before shutdown" trigger, which daphne waits
  for): stop listening for new connections, let running replies finish within
  ``SUPPORTBOT_SHUTDOWN_GRACE_S`` and cut off the rest (saved ``failed`` with their text,
  answered again by the next server), then close every websocket with code 1012
  ("service restart"), so the widget reconnects, to another process or to this one
  restarted, and resumes.

daphne cancels its application instances (the consumers) at the same moment; the
connections themselves stay open until the reactor stops, so replies keep streaming to
them. The close frames are sent on the connections directly: daphne's own close (which
a consumer's ``close()`` goes through) accepts only 1000 and 3000-4999, not 1012. Under
any other server nothing is registered: there the server's own shutdown applies.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

from channels.db import database_sync_to_async
from django.conf import settings

from . import replies, services

log = logging.getLogger(__name__)

CLOSE_SERVICE_RESTART = 1012  # IANA: the server is restarting; the client should reconnect
CLOSE_HANDSHAKE_WAIT_S = 3.0  # at most, for clients to answer the close frames
draining = False  # shutting down: new sockets are turned away


async def replies_sweep() -> int:
    """Mark failed the streaming replies whose writers are gone (any conversation); returns how many."""
    # live_ids: the second sweep (REPLY_STALE_AFTER_S after the start) runs while this
    # process streams replies of its own; they are alive, whatever their age.
    failed = await database_sync_to_async(services.bot_replies_sweep)(
        owner=replies.PROCESS_ID, owner_gone=replies.process_gone, live_ids=replies.live_replies
    )
    log.info("Startup: %d reply(ies) left streaming by stopped processes marked failed", len(failed))
    return len(failed)


async def drain(reactor, grace_s: float) -> None:
    """Finish or cut off running replies, then close every websocket with 1012."""
    global draining
    draining = True
    finished, cut = await replies.replies_stop(grace_s)
    closing = _close_websockets(reactor)
    # Wait for the clients' answers to the close frames (the closing handshake), so the
    # frames are on the wire before the reactor stops and drops the connections.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_HANDSHAKE_WAIT_S
    while any(protocol.state != protocol.STATE_CLOSED for protocol in closing) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    log.info("Shutdown: %d reply(ies) finished, %d cut off; %d websocket(s) closed", finished, cut, len(closing))


def _close_websockets(reactor) -> list:
    """Send every open websocket of this server a close frame (1012, "service restart"); returns their protocols."""
    from autobahn.websocket.protocol import WebSocketProtocol
    from twisted.internet import tcp

    closing = []
    for reader in list(reactor.getReaders()):
        protocol = getattr(reader, "protocol", None) if isinstance(reader, tcp.Server) else None
        if isinstance(protocol, WebSocketProtocol) and protocol.state == WebSocketProtocol.STATE_OPEN:
            try:
                protocol.sendCloseFrame(code=CLOSE_SERVICE_RESTART, reasonUtf8=b"service restart")
            except Exception:  # noqa: BLE001 - one broken connection must not keep the others open
                log.warning("Could not close a websocket for the restart", exc_info=True)
            else:
                closing.append(protocol)
    return closing


async def _sweeps() -> None:
    await replies_sweep()
    await asyncio.sleep(services.REPLY_STALE_AFTER_S + 5)
    await replies_sweep()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("The startup sweep of dead replies failed", exc_info=task.exception())


def _log_start_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A start-up step of the server failed", exc_info=task.exception())


def _stop_listening(reactor) -> None:
    from twisted.internet import tcp

    for reader in list(reactor.getReaders()):
        if isinstance(reader, tcp.Port):
            reader.stopListening()
    log.info("Shutdown: stopped accepting connections")


def install_server_hooks(*, also_on_start: Sequence[Callable[[], Awaitable]] = ()) -> bool:
    """Register the start and stop steps with daphne's reactor; False when not under daphne.

    ``also_on_start``: more coroutine functions to run on the server's loop once it runs
    (the model watcher of ``finetune.serving.runtime``).
    """
    if "twisted.internet.reactor" not in sys.modules:
        return False  # importing it would install a reactor where none is wanted
    from twisted.internet import defer, reactor

    def on_start() -> None:
        asyncio.ensure_future(_sweeps()).add_done_callback(_log_failure)
        for start in also_on_start:
            asyncio.ensure_future(start()).add_done_callback(_log_start_failure)

    def on_stop():
        global draining
        draining = True
        _stop_listening(reactor)
        return defer.Deferred.fromFuture(asyncio.ensure_future(drain(reactor, settings.SUPPORTBOT_SHUTDOWN_GRACE_S)))

    reactor.callWhenRunning(on_start)
    # Registered before daphne registers its own trigger (which cancels the consumers),
    # so it runs first: new sockets are refused before anything else happens.
    reactor.addSystemEventTrigger("before", "shutdown", on_stop)
    return True
