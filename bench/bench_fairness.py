"""Fairness benchmark: a normal customer's first word, idle and with three huge emoji messages in flight.

Issue 14 item 15: three 4,096-character emoji messages at once made every reply time
out, a normal customer's included. Measured here on the batched engine (the chat's
default), with the model the demo serves (the bundled SmolLM2-135M, or ``--model-dir``):

- **idle**: a normal customer ("Where is my order?" under the bot's system prompt) is
  the only request; time from submitting it to its first text delta (the first word
  the widget can show);
- **loaded**: three other conversations have each just sent 4,096 emoji (several
  tokens each) and are being prefilled or answered; then the normal customer asks.

Each setting is run ``--trials`` times (a fresh conversation key each time; the first,
a warm-up, is not counted) and the median is reported, for two engine configurations:

- ``bounded``: the defaults, prompts cut to ``SUPPORTBOT_PROMPT_MAX_TOKENS`` and at most
  ``SUPPORTBOT_PREFILL_TOKENS_PER_STEP`` prompt tokens prefilled between decode steps;
- ``unbounded`` (``--compare``): prompts up to the context window and the whole of every
  admitted prompt prefilled at once, as the engine did before.

Target: loaded first word within 2x idle for ``bounded``.

    .venv/bin/python bench/bench_fairness.py                      # bounded only
    .venv/bin/python bench/bench_fairness.py --compare --trials 3  # both (unbounded takes minutes)

Prints a JSON summary (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.ml.base_model import resolve_base_model  # noqa: E402
from finetune.serving.batched import BatchedEngine  # noqa: E402
from finetune.serving.interface import GenerationDone, GenerationParams, GenerationRequest, TokenDelta  # noqa: E402
from finetune.serving.loading import context_window, load_for_inference  # noqa: E402
from finetune.serving.text import prompt_ids_for, token_budget  # noqa: E402

# BotProfile's default system prompt (conversations/models.py) for the company "Acme".
SYSTEM_PROMPT = (
    "You are the customer support assistant of Acme. Answer briefly and politely. "
    "If you are not sure, offer to connect the customer with a human agent."
)
EMOJI = "\U0001f600\U0001f4e6\U0001f525\U0001f9fe"
HUGE = EMOJI * 1024  # 4,096 characters, the chat's longest message
NORMAL = "Where is my order? I ordered a blender last week and it has not arrived."
# When the normal customer asks, in seconds after the three long messages are in flight.
ARRIVALS_S = (0.2, 0.75, 1.9, 4.1, 6.6, 9.3, 12.8)
PRODUCTS = ["blender", "kettle", "toaster", "lamp", "desk", "chair", "heater", "mixer", "drill", "fan"]


def huge_message(n: int) -> str:
    """The n-th distinct 4,096-character emoji message: its emoji start rotated, so that no
    two share a prompt prefix and the prefix cache cannot spare their prefill."""
    shift = n % len(EMOJI)
    return chr(0x1F300 + n // len(EMOJI)) + (EMOJI[shift:] + EMOJI[:shift]) * 1023 + EMOJI[: len(EMOJI) - 1]


def normal_message(n: int) -> str:
    """The n-th normal customer's question: a new customer each time (only the system
    prompt is in the prefix cache, as for a real new conversation)."""
    return NORMAL.replace("blender", PRODUCTS[n % len(PRODUCTS)]) + f" Order {40417 + 7 * n}."


# The settings' defaults (supportbot/settings.py), without importing Django.
PROMPT_MAX_TOKENS = 1536
PREFILL_TOKENS_PER_STEP = 32
PREFILL_WHOLE_TOKENS = 768


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "customer", "content": text}]


HUGE_FIRST: list[float] = []  # seconds from a long message to its reply's first delta (when reached)


async def first_word(engine, text: str, params: GenerationParams) -> tuple[float, GenerationDone, float]:
    """Seconds from submitting a message to its first text delta, how the reply ended, and the
    longest pause between two of its deltas."""
    request = GenerationRequest(key=f"normal-{uuid.uuid4().hex[:8]}", messages=messages(text), params=params)
    started = time.monotonic()
    first = None
    done = None
    stamps = []
    async for event in engine.stream(request):
        if isinstance(event, TokenDelta):
            stamps.append(time.monotonic())
        if isinstance(event, TokenDelta) and event.text.strip() and first is None:
            first = time.monotonic() - started
        elif isinstance(event, GenerationDone):
            done = event
    pause = max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=0.0)
    return (first if first is not None else float("nan")), done, pause


async def drain(engine, text: str, params: GenerationParams) -> None:
    request = GenerationRequest(key=f"huge-{uuid.uuid4().hex[:8]}", messages=messages(text), params=params)
    started = time.monotonic()
    async for event in engine.stream(request):
        if isinstance(event, TokenDelta) and started is not None:
            HUGE_FIRST.append(time.monotonic() - started)
            started = None


async def measure(engine, params_normal, params_huge, trials: int, timeout: float) -> dict:
    idle, loaded, loaded_ok, pauses = [], [], [], []
    HUGE_FIRST.clear()
    for trial in range(trials + 1):  # trial 0 warms up (prefix cache, allocator)
        seconds, _, _ = await asyncio.wait_for(first_word(engine, normal_message(2 * trial), params_normal), timeout)
        if trial:
            idle.append(seconds)
        huge = [asyncio.ensure_future(drain(engine, huge_message(3 * trial + i), params_huge)) for i in range(3)]
        deadline = time.monotonic() + timeout
        while engine._runner.in_flight < 3 and time.monotonic() < deadline:  # noqa: SLF001 - the bench looks inside
            await asyncio.sleep(0.01)
        # The normal customer arrives at a different moment of the long prompts' work each
        # trial (early or late in their chunked prefill, or once they are being answered).
        await asyncio.sleep(ARRIVALS_S[(trial - 1) % len(ARRIVALS_S)] if trial else 0.2)
        try:
            seconds, done, pause = await asyncio.wait_for(
                first_word(engine, normal_message(2 * trial + 1), params_normal), timeout
            )
        except TimeoutError:
            seconds, done, pause = float("inf"), None, float("inf")
        if trial:
            loaded.append(seconds)
            loaded_ok.append(done is not None and done.finish_reason in {"stop", "length"})
            pauses.append(pause)
        print(
            f"trial {trial}: idle {idle[-1] if trial else '-'} s, loaded {seconds:.3f} s", file=sys.stderr, flush=True
        )
        for task in huge:
            task.cancel()
        await asyncio.gather(*huge, return_exceptions=True)
        while engine._runner.in_flight:  # noqa: SLF001 - the cancelled rows leave within a step
            await asyncio.sleep(0.01)
    idle_median, loaded_median = statistics.median(idle), statistics.median(loaded)
    return {
        "idle_first_word_s": [round(x, 3) for x in idle],
        "loaded_first_word_s": [round(x, 3) for x in loaded],
        "idle_median_s": round(idle_median, 3),
        "loaded_median_s": round(loaded_median, 3),
        "ratio": round(loaded_median / idle_median, 2),
        "normal_replies_completed": all(loaded_ok),
        "preemptions": engine.preemptions,  # passes that gave way to a newly arrived request
        # What the chunk size trades: the loaded normal replies' longest pause between two
        # deltas (streaming beside the long prompts' chunks), and the long messages' own
        # first delta, for those that got that far before their trial ended.
        "loaded_longest_pause_s": [round(x, 3) for x in pauses],
        "long_first_delta_s": sorted(round(x, 2) for x in HUGE_FIRST),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a merged model directory (default: the bundled SmolLM2-135M)")
    parser.add_argument("--model-store", default=str(ROOT / "var" / "models"))
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on one measurement after this")
    parser.add_argument("--compare", action="store_true", help="also measure the unbounded engine (slow)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS_PER_STEP, help="per-step prefill budget")
    parser.add_argument(
        "--prefill-whole", type=int, default=PREFILL_WHOLE_TOKENS, help="a prompt up to this is prefilled whole"
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    path = args.model_dir or resolve_base_model("smollm2", args.model_store).path
    loaded = load_for_inference(path, label="bench", device="cpu")
    window = context_window(loaded)
    huge_tokens = len(loaded.tokenizer(HUGE, add_special_tokens=False)["input_ids"])
    configurations = {"bounded": (PROMPT_MAX_TOKENS, args.prefill_tokens)}
    if args.compare:
        configurations["unbounded"] = (None, 10**9)
    results = {}
    for name, (max_prompt, per_step) in configurations.items():
        engine = BatchedEngine(
            loaded,
            max_batch_size=16,
            num_threads=args.threads,
            prefill_tokens=per_step,
            prefill_whole_tokens=args.prefill_whole if per_step < 10**9 else per_step,
        )
        normal = GenerationParams(
            max_new_tokens=args.max_new_tokens, timeout_s=args.timeout, max_prompt_tokens=max_prompt
        )
        huge = GenerationParams(max_new_tokens=160, timeout_s=args.timeout, max_prompt_tokens=max_prompt)
        prompt_tokens = len(prompt_ids_for(loaded, messages(HUGE), token_budget(window, 160, max_prompt)[0]))
        try:
            results[name] = {
                "max_prompt_tokens": max_prompt,
                "prefill_tokens_per_step": per_step if per_step < 10**9 else None,
                "huge_prompt_tokens": prompt_tokens,
                **asyncio.run(measure(engine, normal, huge, args.trials, args.timeout)),
            }
        finally:
            engine.close(timeout=30)
        print(name, json.dumps(results[name]), flush=True)  # noqa: T201
    summary = {
        "model": path,
        "context_window": window,
        "huge_message": {"characters": len(HUGE), "tokens": huge_tokens},
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "load_1min": os.getloadavg()[0],
        },
        "results": results,
    }
    print(json.dumps(summary, indent=2))  # noqa: T201
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
