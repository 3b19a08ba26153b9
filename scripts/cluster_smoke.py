"""Smoke-check a running cluster (``make cluster``): each web process is healthy and streams a chat reply.

    .venv/bin/python scripts/cluster_smoke.py http://127.0.0.1:8000 http://127.0.0.1:8001

For each web process: ``GET /healthz`` (the status, the version this process serves and
each vLLM server it reports; server details need ``SUPPORTBOT_HEALTHZ_DETAILS=1`` on the
cluster), then one new customer: ``POST /chat/session/``, open ``/ws/chat/``, send a
question and read frames until ``reply_done``. Prints one JSON line per web process (time
to first token, token frames, status, model version, the reply) and exits 1 when a
process is unhealthy or its reply did not complete.

With ``--promote-adapter DIR --base-model DIR`` it first registers the LoRA adapter in
DIR as a new model version and promotes it, as a person does in the admin: the
promotion loads it on every vLLM server of ``SUPPORTBOT_VLLM_URLS`` before it goes live.
That part runs Django, so it needs the cluster's settings (``DATABASE_URL``,
``REDIS_URL``, ``SUPPORTBOT_ENGINE=vllm``, ``SUPPORTBOT_VLLM_URLS``) in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def promote_adapter(adapter: str, base_model: str) -> str:
    """Register ``adapter`` as the next model version and promote it; returns its label."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
    import django

    django.setup()
    from django.db.models import Max

    from finetune.models import ModelVersion
    from finetune.services.model_versions import model_version_promote

    number = (ModelVersion.objects.aggregate(top=Max("number"))["top"] or 0) + 1
    version = ModelVersion.objects.create(
        number=number, base_model=base_model, adapter_path=str(Path(adapter).resolve()), notes="cluster_smoke.py"
    )
    # No metrics to gate on: a person's reason promotes it, as in the admin.
    return model_version_promote(version=version, reason="cluster smoke check").label


def healthz(base: str) -> tuple[int, dict]:
    """The status and report of ``/healthz``; status 0 when the process does not answer."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=15) as response:  # noqa: S310 - an operator's URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError as error:
        return 0, {"error": f"{type(error).__name__}: {error}"}


def chat_token(base: str) -> str:
    request = urllib.request.Request(  # noqa: S310 - an operator's URL
        f"{base}/chat/session/",
        data=b"{}",
        headers={"Origin": base, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
        return json.loads(response.read())["token"]


async def ask(base: str, question: str, timeout: float) -> dict:
    """One customer asks ``question``; what the reply looked like from the browser's side."""
    from websockets.asyncio.client import connect

    token = await asyncio.to_thread(chat_token, base)
    url = base.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/chat/?token={token}"
    async with connect(url, origin=base, proxy=None, open_timeout=15) as ws:
        await ws.recv()  # the greeting frame
        sent = time.monotonic()
        await ws.send(json.dumps({"type": "message", "client_id": "smoke-1", "text": question}))
        first, tokens, text = None, 0, []
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "token":
                    first = first or time.monotonic()
                    tokens += 1
                    text.append(frame["delta"])
                elif frame["type"] == "error":
                    return {"status": "error", "error": frame}
                elif frame["type"] == "reply_done":
                    done = time.monotonic()
                    return {
                        "status": frame["status"],
                        "model_version": frame.get("model_version"),
                        "first_token_s": round(first - sent, 2) if first else None,
                        "reply_s": round(done - sent, 2),
                        "token_frames": tokens,
                        "streamed_equals_saved": "".join(text).strip() == frame["body"],
                        "reply": frame["body"],
                    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("web", nargs="+", help="base URLs of the web processes")
    parser.add_argument("--question", default="Where is my order?")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a reply may take")
    parser.add_argument("--promote-adapter", help="a LoRA adapter directory to register and promote first")
    parser.add_argument("--base-model", help="the adapter's base model (what the vLLM servers serve)")
    args = parser.parse_args()
    if args.promote_adapter:
        if not args.base_model:
            parser.error("--promote-adapter needs --base-model (the directory the vLLM servers serve)")
        started = time.monotonic()
        label = promote_adapter(args.promote_adapter, args.base_model)
        print(json.dumps({"promoted": label, "seconds": round(time.monotonic() - started, 1)}))  # noqa: T201

    ok = True
    for base in args.web:
        status, report = healthz(base)
        if status == 0:
            result = {"web": base, "healthz": 0, "status": "unreachable", "error": report["error"]}
        else:
            model = report["checks"]["model"]
            result = {
                "web": base,
                "healthz": status,
                "serving": (model.get("this_process") or {}).get("serving"),
                "vllm_servers": model.get("vllm_servers"),
            }
            try:
                result.update(asyncio.run(ask(base, args.question, args.timeout)))
            except (OSError, TimeoutError) as error:
                result.update(status="error", error=f"{type(error).__name__}: {error}")
        ok = ok and status == 200 and result["status"] == "complete"
        print(json.dumps(result))  # noqa: T201
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
