"""Scale-out benchmark: our in-process BatchedEngine against a vLLM CPU server, and one against two web processes.

Same model for both engines, SmolLM2-135M-Instruct (the bundled GGUF, exported once
to a Hugging Face directory in the model store, which vLLM needs), same prompts (the
chat's system prompt and Bitext questions, as bench_engine.py builds them), greedy.
At each concurrency (1, 16 and 64 conversations by default), every conversation sends
``--turns`` messages one after another. Measured:

- ``engines``: aggregate tokens/s (generated tokens / wall time) and time to first
  token p50/p95, the BatchedEngine in this process, then ``VLLMEngine`` against one
  vLLM server started here as the product starts one (``scripts/vllm-serve.sh``: the
  n-gram ban plugin, so its cost is in the numbers, and LoRA enabled; the venv is built
  once by ``scripts/vllm-venv.sh``). The two run one after the other, never together.
- ``web``: the same questions through real websockets to one, then two, daphne
  processes (``SUPPORTBOT_ENGINE=vllm``, the Redis channel layer, PostgreSQL), sockets
  spread evenly over them: first token p50/p95 as the customer sees it, replies/s, and
  model tokens/s read from the vLLM server's own counter.

    .venv/bin/python bench/bench_scale.py --json var/bench/scale.json                # full
    .venv/bin/python bench/bench_scale.py --concurrency 1,4 --max-new-tokens 16 --skip-web   # smoke
    .venv/bin/python bench/bench_scale.py --skip-web --ngram-ban-ab   # also vLLM without the n-gram ban

``web`` needs DATABASE_URL (PostgreSQL; the bench migrates it and sets an active
version there: use a database of its own) and REDIS_URL. Prints a JSON summary with the
machine's load average before and after each part, since a loaded machine skews both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import conversation_messages, load_exchanges, percentile, run_level  # noqa: E402

from finetune.ml.base_model import convert_bundled  # noqa: E402
from finetune.ml.decoding import DecodingConfig  # noqa: E402
from finetune.serving.batched import BatchedEngine  # noqa: E402
from finetune.serving.loading import LoadedModel, load_for_inference  # noqa: E402
from finetune.serving.vllm import ServedVersion, VLLMEngine, VLLMServers  # noqa: E402

VERSION_NAME = "supportbot-v1"  # what the bench database's active version is served as


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:  # noqa: S310 - local server
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def start_vllm(model: Path, work: Path, args) -> tuple[subprocess.Popen, str, float]:
    """A vLLM server started as the product starts one (scripts/vllm-serve.sh: the n-gram ban plugin,
    LoRA enabled), serving ``model``; returns it, its URL and its start-up time."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "DJANGO_SETTINGS_MODULE"}}
    env.update(
        SUPPORTBOT_VLLM_BASE=str(model),
        VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib),
        VLLM_MAX_MODEL_LEN=str(args.max_model_len),
        VLLM_DTYPE=args.vllm_dtype,
        PY=sys.executable,
        # vLLM keeps one core out of its compute threads by default (for its API server); the
        # in-process engine computes on every core, so by default vLLM does too.
        VLLM_CPU_NUM_OF_RESERVED_CPU=str(args.vllm_reserved_cpus),
    )
    if args.threads:
        # As many compute threads as the in-process engine gets: cores 0..threads-1.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    log = (work / "vllm.log").open("w")
    started = time.monotonic()
    process = subprocess.Popen(
        [
            "bash",
            str(ROOT / "scripts" / "vllm-serve.sh"),
            str(port),
            # Added to the script's arguments (the last of a repeated one counts): two names for one
            # model, the base and the bench database's active version, and room for every chat at once.
            "--served-model-name",
            "supportbot-base",
            VERSION_NAME,
            "--max-num-seqs",
            str(max(args.levels + args.web_levels)),
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() takes the engine core too
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):  # noqa: S310 - local server
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vLLM did not start; see {work / 'vllm.log'}") from None
            time.sleep(1)
    if "NoRepeatNGramLogitsProcessor" not in (work / "vllm.log").read_text(errors="replace"):
        stop(process)
        raise SystemExit(f"vLLM started without the n-gram ban plugin; see {work / 'vllm.log'}")
    return process, url, time.monotonic() - started


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def vllm_memory_mb(process: subprocess.Popen) -> float:
    """Resident memory of the vLLM server's process group (API server and engine core)."""
    import psutil

    root = psutil.Process(process.pid)
    return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)


async def engines_part(model: Path, exchanges, args, work: Path) -> dict:
    from transformers import AutoTokenizer

    out: dict = {"batched": [], "vllm": [], "load_before": load()}
    if not args.skip_engines:
        loaded = load_for_inference(str(model), label="base", device="cpu")
        engine = BatchedEngine(loaded, max_batch_size=args.max_batch_size, num_threads=args.threads or None)
        try:
            await run_level(engine, exchanges, 1, _level_args(args, turns=1), random.Random(0))  # warm-up
            for level in args.levels:
                result = await run_level(engine, exchanges, level, _level_args(args), random.Random(level))
                out["batched"].append(result)
                print(json.dumps({"batched": result}), file=sys.stderr)
        finally:
            engine.close(timeout=30)
        del loaded, engine
    out["load_between"] = load()

    process, url, startup_s = start_vllm(model, work, args)
    out["vllm_startup_s"] = round(startup_s, 1)
    try:
        servers = VLLMServers([url], read_timeout_s=3600)
        version = ServedVersion(label="base", name="supportbot-base", files=str(model), lora_path=None)
        tokenizer = AutoTokenizer.from_pretrained(model)
        # The product's decoding (the n-gram ban, which the server's plugin applies), and with
        # --ngram-ban-ab the same requests without it too: the plugin's cost on the same server.
        variants = {"vllm": DecodingConfig()}
        if args.ngram_ban_ab:
            variants["vllm_no_ngram_ban"] = DecodingConfig(no_repeat_ngram_size=0)
        for key, decoding in variants.items():
            out[key] = []
            loaded = LoadedModel(model=None, tokenizer=tokenizer, label="base", decoding=decoding)
            vllm = VLLMEngine(servers, version, loaded, max_model_len=args.max_model_len)
            await run_level(vllm, exchanges, 1, _level_args(args, turns=1), random.Random(0))  # warm-up
            for level in [] if args.skip_engines else args.levels:
                out[key].append(await run_level(vllm, exchanges, level, _level_args(args), random.Random(level)))
                print(json.dumps({key: out[key][-1]}), file=sys.stderr)
        out["vllm_memory_mb"] = vllm_memory_mb(process)
        if not args.skip_web:
            out["web"] = await web_part(url, model, args, work)
    finally:
        stop(process)
    out["load_after"] = load()
    return out


def _level_args(args, turns: int | None = None):
    return argparse.Namespace(
        max_new_tokens=args.max_new_tokens,
        turns=turns or args.turns,
        history="human",
        stagger_ms=args.stagger_ms,
        think_ms=0,
    )


# --- web processes ----------------------------------------------------------------------------


def _web_env(vllm_url: str, args) -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("DATABASE_URL", "").startswith("postgres") or not env.get("REDIS_URL"):
        raise SystemExit("The web part needs DATABASE_URL (PostgreSQL, a database of its own) and REDIS_URL.")
    env.update(
        DJANGO_SETTINGS_MODULE="supportbot.settings",
        PYTHONPATH=str(ROOT),
        SUPPORTBOT_ENGINE="vllm",
        SUPPORTBOT_VLLM_URLS=vllm_url,
        SUPPORTBOT_VLLM_READ_TIMEOUT_S="3600",
        SUPPORTBOT_RATE_LIMIT="100000",
        SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD="-1000",
        SUPPORTBOT_REVIEW_SAMPLE_SHARE="0",
        SUPPORTBOT_DOUBLE_REVIEW_SHARE="0",
        SUPPORTBOT_GENERATION_TIMEOUT_S="3600",
        SUPPORTBOT_MAX_NEW_TOKENS=str(args.max_new_tokens),
        DJANGO_LOG_LEVEL="WARNING",
    )
    return env


def _prepare_database(env: dict[str, str], model: Path) -> None:
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    # Version 1, active, served by the vLLM server under VERSION_NAME (a merged export: the base itself).
    activate = (
        "from finetune.models import ModelVersion as M\n"
        "M.objects.filter(status='active').update(status='retired')\n"
        f"M.objects.update_or_create(number=1, defaults=dict(status='active', base_model='smollm2', "
        f"adapter_path={str(model)!r}, merged_path={str(model)!r}, notes='bench_scale'))\n"
    )
    subprocess.run([sys.executable, "manage.py", "shell", "-c", activate], cwd=ROOT, env=env, check=True)


def _start_daphne(env: dict[str, str], work: Path, index: int) -> tuple[subprocess.Popen, str]:
    import socket

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "supportbot.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=(work / f"daphne-{index}.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daphne did not start; see {work / f'daphne-{index}.log'}") from None
            time.sleep(0.3)


async def _web_level(bases: list[str], exchanges, level: int, args, vllm_url: str) -> dict:
    from bench_websockets import Client, Stats, chat_token

    stats = Stats()
    clients = [Client(bases[i % len(bases)], i, stats) for i in range(level)]
    for client in clients:
        await client.open(await asyncio.to_thread(chat_token, client.base))
    generated = metric(vllm_url, "vllm:generation_tokens_total")

    async def chat(index: int, client) -> None:
        await asyncio.sleep(random.Random(index).uniform(0, args.stagger_ms / 1000))
        for turn in range(args.turns):
            question = conversation_messages(exchanges, index, turn, args.turns)[-1]["content"]
            await client.ask(question, 3600)

    start = time.monotonic()
    await asyncio.gather(*(chat(i, c) for i, c in enumerate(clients)))
    wall = time.monotonic() - start
    tokens = metric(vllm_url, "vllm:generation_tokens_total") - generated
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return {
        "web_processes": len(bases),
        "concurrency": level,
        "replies": len(stats.reply_ms),
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "replies_per_s": round(len(stats.reply_ms) / wall, 2),
        "first_token_p50_ms": _r(percentile(stats.ttft_ms, 0.5)),
        "first_token_p95_ms": _r(percentile(stats.ttft_ms, 0.95)),
        "reply_p95_ms": _r(percentile(stats.reply_ms, 0.95)),
    }


def _r(value):
    return None if value is None else round(value, 1)


async def web_part(vllm_url: str, model: Path, args, work: Path) -> dict:
    env = _web_env(vllm_url, args)
    _prepare_database(env, model)
    exchanges, _ = load_exchanges(args.exchanges, args.seed)
    out: dict = {"runs": [], "load_before": load()}
    for count in (1, 2):
        processes = [_start_daphne(env, work, i) for i in range(count)]
        try:
            bases = [base for _, base in processes]
            await _web_level(bases, exchanges, 1, _level_args(args, turns=1), vllm_url)  # warm-up
            for level in args.web_levels:
                out["runs"].append(await _web_level(bases, exchanges, level, args, vllm_url))
                print(json.dumps({"web": out["runs"][-1]}), file=sys.stderr)
        finally:
            for process, _ in processes:
                process.terminate()
                process.wait(30)
    out["load_after"] = load()
    return out


async def main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir) if args.model_dir else convert_bundled(Path(args.model_store))
    exchanges, source = load_exchanges(args.exchanges, args.seed)
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_at_start": load()},
        "model": str(model),
        "prompts": source,
        "levels": args.levels,
        "turns": args.turns,
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size_batched": args.max_batch_size,
        "max_model_len": args.max_model_len,
    }
    summary.update(await engines_part(model, exchanges, args, work))
    summary["machine"]["load_at_end"] = load()
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16,64", help="conversations at once, comma-separated")
    parser.add_argument("--web-concurrency", default="16,64", help="chats at once in the web part")
    parser.add_argument("--turns", type=int, default=1, help="messages per conversation (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64, help="BatchedEngine's batch (default 64)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--stagger-ms", type=float, default=200.0, help="conversations start within this window")
    parser.add_argument("--exchanges", type=int, default=400, help="Bitext exchanges to draw questions from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="compute threads of both engines (0: all cores)")
    parser.add_argument("--model-dir", help="a Hugging Face model directory (default: the bundled SmolLM2 export)")
    parser.add_argument("--model-store", default=str(ROOT / "var" / "models"))
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    parser.add_argument("--vllm-dtype", default="float32", help="float32 (default: as the in-process engine)")
    parser.add_argument("--vllm-reserved-cpus", type=int, default=0, help="cores vLLM keeps from compute")
    parser.add_argument(
        "--ngram-ban-ab",
        action="store_true",
        help="also run vLLM's levels without the n-gram ban (the plugin idle): the plugin's cost",
    )
    parser.add_argument("--skip-web", action="store_true", help="engines only, no daphne processes")
    parser.add_argument("--skip-engines", action="store_true", help="the web part only (vLLM still starts)")
    parser.add_argument("--work", default=str(ROOT / "var" / "bench" / "scale"))
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.web_levels = [int(x) for x in args.web_concurrency.split(",") if x.strip()]
    return args


if __name__ == "__main__":
    arguments = parse_args()
    result = asyncio.run(main(arguments))
    text = json.dumps(result, indent=2)
    print(text)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(text)
