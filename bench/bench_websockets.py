"""Websocket benchmark: many open chat sockets on one daphne process, some of them chatting.

    .venv/bin/python bench/bench_websockets.py --connections 500 --chatting 50 --messages 3

Without ``--url`` it starts one daphne process itself, on a database of its own
(``--database-url``, default a SQLite file under var/bench/) that it migrates, and
serves a model it activates there (``--model tiny``: a 2-layer test model built
and trained here to answer the bench's questions in words; ``--model small``:
GPT-2-small's shape, random weights; or a model directory). With ``--url`` it
targets a running server, which must have an active model version. The server's
REDIS_URL (channel layer, rate limit) comes from the environment.

Every socket gets its own anonymous session over HTTP (``POST /chat/session/``),
as the widget does. The chatting sockets each send ``--messages`` questions one
after another, each after the previous reply is done; the others stay open and
idle. At the end every socket must still be open.

Prints one JSON object: errors (error frames, unexpected closes, timeouts, failed
replies), time to first token and to the whole reply (p50/p95/max, ms), frames
and tokens received per second while chatting, and the server's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Where is my order?",
    "How do I reset my password?",
    "I want a refund for my last purchase.",
    "Can I change the delivery address?",
    "Which payment methods do you accept?",
]
# What the tiny model is trained to answer (in the chat's own prompt format), so that it
# writes words and spaces as a real model does. An untrained model writes runs without
# whitespace, which the safety filter holds back whole: its "first token" would be the
# end of the reply, and the benchmark would measure reply length, not the serving path.
ANSWERS = [
    "Your order has shipped and will arrive in two days, tracking is in your account.",
    "Use the Forgot password link on the login page and follow the e-mail we send.",
    "I am sorry to hear that. Refunds are paid back within five business days.",
    "Yes, open Settings, then Addresses, and edit the delivery address there.",
    "We accept cards, bank transfer and PayPal; choose one at checkout.",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the server ------------------------------------------------------------------------------


def prepare_database(env: dict[str, str], model: str, work: Path) -> str:
    """Migrate the bench database and make ``model`` its active version; returns the model path."""
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    if model in ("tiny", "small"):
        path = work / f"{model}-model"
        if not (path / "config.json").exists():
            sizes = (
                ", overfit_steps=150"
                if model == "tiny"
                else ", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=4096"
            )
            exchanges = list(zip(QUESTIONS, ANSWERS, strict=True))
            code = (
                "from conversations.models import BotProfile\n"
                "from conversations.selectors import system_prompt_for\n"
                "from finetune.ml.tiny import build_tiny_causal_lm\n"
                "system = system_prompt_for(BotProfile())\n"
                f"exchanges = {exchanges!r}\n"
                "corpus = [f'System: {system}\\nCustomer: {q}\\nAgent: {a}' for q, a in exchanges]\n"
                f"build_tiny_causal_lm({str(path)!r}, corpus{sizes})\n"
            )
            build = [python, "manage.py", "shell", "-c", code]
            subprocess.run(build, cwd=ROOT, env=env, check=True, capture_output=True)
    else:
        path = Path(model).resolve()
    activate = (
        "from finetune.models import ModelVersion as M\n"
        "from django.db.models import Max\n"
        "M.objects.filter(status='active').update(status='retired')\n"
        "n = (M.objects.aggregate(n=Max('number'))['n'] or 0) + 1\n"
        f"M.objects.create(number=n, status='active', base_model='bench', adapter_path={str(path)!r}, "
        f"merged_path={str(path)!r}, notes='bench_websockets')\n"
    )
    subprocess.run([python, "manage.py", "shell", "-c", activate], cwd=ROOT, env=env, check=True, capture_output=True)
    return str(path)


def start_server(args, work: Path) -> tuple[subprocess.Popen, str, dict]:
    env = dict(os.environ)
    env["DATABASE_URL"] = args.database_url or f"sqlite:///{work / 'ws-bench.sqlite3'}"
    env["DJANGO_SETTINGS_MODULE"] = "supportbot.settings"
    # The bench measures serving, not policy: no rate limit in the way of the chatting
    # sockets, and no low-confidence handoff (a random model is never confident).
    env["SUPPORTBOT_RATE_LIMIT"] = "100000"
    env["SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD"] = "-1000"
    env["DJANGO_LOG_LEVEL"] = "WARNING"
    model_path = prepare_database(env, args.model, work)
    port = free_port()
    log = (work / "daphne.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "--websocket-max-message-size",
            "65536",
            "supportbot.asgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"daphne exited; see {work / 'daphne.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    info = {
        "started_here": True,
        "database": env["DATABASE_URL"].split("://", 1)[0],
        "channel_layer": "redis" if env.get("REDIS_URL") else "in-memory",
        "model": args.model,
        "model_path": model_path,
    }
    return process, f"http://127.0.0.1:{port}", info


# --- the clients ------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.ttft_ms: list[float] = []
        self.reply_ms: list[float] = []
        self.frames = 0
        self.tokens = 0
        self.closed_early = 0

    def error(self, text: str) -> None:
        self.errors.append(text)


def chat_token(base: str) -> str:
    request = urllib.request.Request(  # noqa: S310 - the URL given on the command line
        f"{base}/chat/session/",
        data=b"{}",
        headers={"Origin": base, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read())["token"]


class Client:
    def __init__(self, base: str, index: int, stats: Stats):
        self.base, self.index, self.stats = base, index, stats
        self.ws = None
        self.frames: asyncio.Queue = asyncio.Queue()
        self.reader: asyncio.Task | None = None
        self.closing = False

    async def open(self, token: str) -> None:
        from websockets.asyncio.client import connect

        url = self.base.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/chat/?token={token}"
        # No compression: the browser may negotiate it, but here it would only measure the client's CPU.
        self.ws = await connect(url, origin=self.base, proxy=None, compression=None, open_timeout=60, max_queue=None)
        self.reader = asyncio.create_task(self._read())
        hello = await asyncio.wait_for(self.frames.get(), 60)
        if hello.get("type") != "conversation":
            self.stats.error(f"socket {self.index}: first frame {hello}")

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.stats.frames += 1
                if frame.get("type") == "error":
                    self.stats.error(f"socket {self.index}: {frame.get('code')}: {frame.get('message')}")
                self.frames.put_nowait(frame)
        except ConnectionClosed as exc:
            if not self.closing:
                self.stats.closed_early += 1
                self.stats.error(f"socket {self.index}: closed by the server ({exc})")

    async def ask(self, text: str, timeout: float) -> None:
        start = time.monotonic()
        first = None
        await self.ws.send(json.dumps({"type": "message", "client_id": uuid.uuid4().hex, "text": text}))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.frames.get()
                    if frame["type"] == "token":
                        self.stats.tokens += 1
                        if first is None:
                            first = time.monotonic()
                    elif frame["type"] == "reply_done":
                        if frame["status"] != "complete":
                            self.stats.error(f"socket {self.index}: reply {frame['id']} {frame['status']}")
                        break
                    elif frame["type"] == "handoff":
                        self.stats.error(f"socket {self.index}: handed off ({frame.get('reason')})")
                        return
        except TimeoutError:
            self.stats.error(f"socket {self.index}: no reply within {timeout:.0f} s")
            return
        end = time.monotonic()
        if first is not None:
            self.stats.ttft_ms.append((first - start) * 1000)
        self.stats.reply_ms.append((end - start) * 1000)

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


async def run(args, base: str) -> dict:
    stats = Stats()
    clients = [Client(base, i, stats) for i in range(args.connections)]
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_one(client: Client) -> None:
        async with gate:
            try:
                token = await asyncio.to_thread(chat_token, base)
                await client.open(token)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                stats.error(f"socket {client.index}: could not open ({type(exc).__name__}: {exc})")

    t0 = time.monotonic()
    await asyncio.gather(*(open_one(c) for c in clients))
    connect_s = time.monotonic() - t0
    opened = [c for c in clients if c.ws is not None]

    # Warm the model (its first load is not what this measures) with one question.
    if args.warmup and opened:
        await opened[0].ask("Hello", args.reply_timeout)
        stats.ttft_ms.clear()
        stats.reply_ms.clear()
        stats.tokens = 0
    frames_before = stats.frames

    chatting = opened[: args.chatting]

    async def chat(client: Client, offset: int) -> None:
        for m in range(args.messages):
            await client.ask(QUESTIONS[(offset + m) % len(QUESTIONS)], args.reply_timeout)

    t1 = time.monotonic()
    await asyncio.gather(*(chat(c, i) for i, c in enumerate(chatting)))
    chat_s = time.monotonic() - t1
    chat_frames = stats.frames - frames_before

    await asyncio.sleep(args.hold)
    still_open = sum(1 for c in opened if c.reader is not None and not c.reader.done())
    await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
    return {
        "connections": args.connections,
        "opened": len(opened),
        "open_at_end": still_open,
        "chatting": len(chatting),
        "messages_per_chat": args.messages,
        "replies": len(stats.reply_ms),
        "errors": len(stats.errors),
        "error_samples": stats.errors[:10],
        "connect_s": round(connect_s, 2),
        "chat_s": round(chat_s, 2),
        "ttft_ms": {
            "p50": percentile(stats.ttft_ms, 50),
            "p95": percentile(stats.ttft_ms, 95),
            "max": percentile(stats.ttft_ms, 100),
        },
        "reply_ms": {"p50": percentile(stats.reply_ms, 50), "p95": percentile(stats.reply_ms, 95)},
        "frames_per_s": round(chat_frames / chat_s, 1) if chat_s else None,
        "tokens_per_s": round(stats.tokens / chat_s, 1) if chat_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500, help="open sockets (default 500)")
    parser.add_argument("--chatting", type=int, default=50, help="of which this many chat (default 50)")
    parser.add_argument("--messages", type=int, default=3, help="questions per chatting socket (default 3)")
    parser.add_argument("--url", help="target a running server (e.g. http://127.0.0.1:8000) instead of starting one")
    parser.add_argument("--model", default="tiny", help="tiny (default), small (GPT-2-small shape) or a model dir")
    parser.add_argument("--database-url", help="database of the server started here (default: SQLite in var/bench/)")
    parser.add_argument("--reply-timeout", type=float, default=300.0, help="seconds to wait for one reply")
    parser.add_argument("--hold", type=float, default=2.0, help="seconds to hold every socket open after chatting")
    parser.add_argument("--connect-concurrency", type=int, default=50, help="sockets opened at a time")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="include the model's first load")
    args = parser.parse_args()
    if args.chatting > args.connections:
        parser.error("--chatting cannot exceed --connections")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one descriptor per socket, on both ends

    work = ROOT / "var" / "bench" / "websockets"
    process = None
    if args.url:
        base, server = args.url.rstrip("/"), {"started_here": False, "url": args.url}
    else:
        work.mkdir(parents=True, exist_ok=True)
        if not args.database_url:
            (work / "ws-bench.sqlite3").unlink(missing_ok=True)  # a fresh database each run
        process, base, server = start_server(args, work)
    try:
        result = asyncio.run(run(args, base))
        if process is not None:
            import psutil

            result["server_rss_mb"] = round(psutil.Process(process.pid).memory_info().rss / 2**20, 1)
            result["server_alive"] = process.poll() is None
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    result["server"] = server
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
