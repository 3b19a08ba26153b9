"""Readiness checks for ``/healthz``: database, channel layer, Celery broker, active model.

Each check returns ``{"ok": bool, ...details}`` and never raises; the view answers
200 when the database, channel layer and broker are all usable and this process
serves the active model version (or is loading it), 503 otherwise. A missing model
version is reported but does not make the service unhealthy: the chat still works and
offers a human; a process still serving a replaced version does.

What failed is public; why is not: an error's text names hosts, ports, users and
paths, so it is shown to staff and, with ``SUPPORTBOT_HEALTHZ_DETAILS``, to everyone
(a health checker on a private network); others get ``PUBLIC_ERROR``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0
PUBLIC_ERROR = "Unavailable. Staff see why here (or set SUPPORTBOT_HEALTHZ_DETAILS=1); the server log says too."


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def database_check() -> dict:
    start = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", reported as text
        return {"ok": False, "vendor": connection.vendor, "error": f"{type(exc).__name__}: {exc}"}
    pooled = bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))
    return {"ok": True, "vendor": connection.vendor, "pooled": pooled, "latency_ms": _elapsed_ms(start)}


async def channel_layer_check() -> dict:
    """Send a message to a fresh channel of the probe's own and read it back.

    Not a ``new_channel()``: those are process-local channels ("...!..."), which the Redis
    layer reads through one shared reader per process, held in turn by every open chat
    socket and the model listener for up to 5 s each, so a probe among them waited past
    its timeout. A plain channel name is read directly, by the probe alone.
    """
    layer = get_channel_layer()
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]
    if layer is None:
        return {"ok": False, "backend": backend, "error": "No channel layer configured."}
    start = time.monotonic()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            channel = f"healthz.{uuid.uuid4().hex}"
            token = uuid.uuid4().hex
            await layer.send(channel, {"type": "healthz.ping", "token": token})
            message = await layer.receive(channel)
        if message.get("token") != token:
            return {"ok": False, "backend": backend, "error": "Read back a different message."}
    except TimeoutError:
        return {"ok": False, "backend": backend, "error": f"No answer within {CHECK_TIMEOUT_S:.0f} s."}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "backend": backend, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "backend": backend, "latency_ms": _elapsed_ms(start)}


def broker_check() -> dict:
    """Open a connection to the Celery broker named in settings now (not at import)."""
    from supportbot.celery import app

    url = settings.CELERY_BROKER_URL
    transport = url.split("://", 1)[0]
    start = time.monotonic()
    try:
        with app.connection_for_write(url=url) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_S)
            if transport == "filesystem":
                # The filesystem transport "connects" without touching disk; check the folder.
                folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]
                conn.default_channel  # noqa: B018 - creates the channel, which creates the folder
                import os

                if not os.access(folder, os.W_OK):
                    return {"ok": False, "transport": transport, "error": f"Broker folder {folder} is not writable."}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "transport": transport, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "transport": transport, "latency_ms": _elapsed_ms(start)}


def model_check() -> dict:
    """The active version (database), what this answering process serves (memory), and each vLLM server.

    ok only when this process serves the active version or says it is loading it (or
    loads it on the first reply); a process still serving an older version is not ok.
    With ``SUPPORTBOT_ENGINE=vllm``, ``vllm_servers`` lists every configured server:
    whether it answers, and the model names it serves. They are asked concurrently, within
    ``CHECK_TIMEOUT_S`` in all. A server that is down does not make this check fail: the
    others take its conversations, and a web process that cannot reach any still serves
    the chat (a person answers); taking web processes out of the balancer for it would not
    help.
    """
    from finetune.serving.runtime import engine_converged, engine_status, vllm_health

    here = {"this_process": engine_status()}
    servers = vllm_health(timeout_s=CHECK_TIMEOUT_S)
    if servers is not None:
        here["vllm_servers"] = servers
    try:
        from finetune.selectors import model_version_active

        version = model_version_active()
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "active_version": None, "error": f"{type(exc).__name__}: {exc}", **here}
    converged, why = engine_converged(version.label if version else None)
    note = {"note": why} if why else {}
    if version is None:
        if converged:
            note = {"note": "No model version is active; chat offers a human."}
        return {"ok": converged, "active_version": None, **note, **here}
    return {"ok": converged, "active_version": version.label, "base_model": version.base_model, **note, **here}


def _without_error_details(check: dict) -> dict:
    public = {key: (PUBLIC_ERROR if key == "error" and value else value) for key, value in check.items()}
    if isinstance(check.get("this_process"), dict):
        public["this_process"] = _without_error_details(check["this_process"])
    if isinstance(check.get("vllm_servers"), list):
        # Server URLs name hosts and ports: staff only, like error texts.
        public["vllm_servers"] = [{"ok": server["ok"]} for server in check["vllm_servers"]]
    return public


async def health_report(*, details: bool = True) -> tuple[bool, dict]:
    """Run all checks concurrently; the first result says whether the service is usable.

    Without ``details``, error texts are replaced by ``PUBLIC_ERROR`` (and logged).
    """
    db, layer, broker, model = await asyncio.gather(
        sync_to_async(database_check)(),
        channel_layer_check(),
        sync_to_async(broker_check, thread_sensitive=False)(),
        sync_to_async(model_check)(),
    )
    healthy = db["ok"] and layer["ok"] and broker["ok"] and model["ok"]
    checks = {"database": db, "channel_layer": layer, "celery_broker": broker, "model": model}
    if not details:
        for name, check in checks.items():
            if (
                check.get("error")
                or (check.get("this_process") or {}).get("error")
                or not all(server["ok"] for server in check.get("vllm_servers") or [])
            ):
                log.warning("Health check %s failed: %s", name, check)
        checks = {name: _without_error_details(check) for name, check in checks.items()}
    return healthy, {"status": "ok" if healthy else "unavailable", "checks": checks}
