"""Benchmark: the served path end to end on a real version, as customers get it; prints JSON.

Loads a model version the way serving does (``load_for_inference``: weights, retrieval
index, decoding/grounding/reply-policy settings), then answers validation questions of
its dataset through ``SafeEngine(BatchedEngine)`` with the plan the runtime builds
(``ground_request``, the reply policy bound to the neighbours, the PII filter, the
placeholder filler with demo company facts), all questions at once as concurrent chats.
Reported per reply and in sum: milliseconds until the first text reaches the customer and
until the reply is done, the reply's source (model words or a retrieved answer), cuts,
replies showing a template slot or a repetition. No Django, no database.

    .venv/bin/python bench/bench_served_replies.py RUN_DIR DATASET_DIR --limit 8

``RUN_DIR`` holds ``merged/`` (or is the model directory itself) and, for a grounded
version, ``retrieval/`` and ``train_config.json``; ``DATASET_DIR`` is the dataset it was
trained on (its ``validation`` split is asked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see docs/quality-research.md

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.ml.quality import SLOT_RE  # noqa: E402
from finetune.serving.batched import BatchedEngine  # noqa: E402
from finetune.serving.grounded import ground_request, reply_decider  # noqa: E402
from finetune.serving.interface import GenerationParams, GenerationRequest, TokenDelta  # noqa: E402
from finetune.serving.loading import load_for_inference  # noqa: E402
from finetune.serving.repetition import has_repetition  # noqa: E402
from finetune.serving.safety import ReplyPlan, SafeEngine, reply_maskers  # noqa: E402

FACTS = {
    "company_name": "Acme",
    "support_phone": "0800 555 0199",
    "support_email": "help@acme.example",
    "website_url": "https://acme.example",
    "support_hours": "Monday to Friday, 9:00-17:00",
}


async def answer(engine, loaded, messages, max_new_tokens: int, key: str) -> dict:
    async def plan_for(request):
        plan = ReplyPlan(maskers=reply_maskers(), facts=FACTS)
        grounding = await asyncio.to_thread(ground_request, loaded, request.messages, max_new_tokens)
        if grounding is not None:
            plan.messages, plan.prime, plan.grounding = grounding.messages, grounding.prime, grounding.log()
            plan.decide = reply_decider(loaded.reply_policy, grounding.hits)
        return plan

    safe = SafeEngine(engine, plan_for=plan_for)
    request = GenerationRequest(key=key, messages=messages, params=GenerationParams(max_new_tokens=max_new_tokens))
    started = time.perf_counter()
    first = None
    done = None
    async for event in safe.stream(request):
        if isinstance(event, TokenDelta):
            if first is None and event.text.strip():
                first = time.perf_counter()
        else:
            done = event
    end = time.perf_counter()
    return {
        "first_text_ms": round((first - started) * 1000) if first else None,
        "total_ms": round((end - started) * 1000),
        "source": done.source,
        "cut": done.cut_reason,
        "tokens": done.token_count,
        "finish": done.finish_reason,
        "slot": bool(SLOT_RE.search(done.text)),
        "repeats": has_repetition(done.text),
        "grounded_on": [g["origin"] for g in done.grounding],
        "reply": done.text[:300],
    }


async def run(args) -> dict:
    from datasets import load_from_disk

    run_dir = Path(args.run_dir)
    model_dir = run_dir / "merged" if (run_dir / "merged").is_dir() else run_dir
    loaded = load_for_inference(str(model_dir), label="bench", device="cpu")
    validation = load_from_disk(str(Path(args.dataset_dir) / "validation"))
    rows = [validation[i]["messages"] for i in range(min(args.limit, len(validation)))]
    questions = [[m for m in row[:-1]] for row in rows]
    engine = BatchedEngine(loaded, max_batch_size=args.limit)
    try:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(answer(engine, loaded, q, args.max_new_tokens, f"c{i}") for i, q in enumerate(questions))
        )
        wall = time.perf_counter() - started
    finally:
        engine.close(timeout=10)
    firsts = [r["first_text_ms"] for r in results if r["first_text_ms"] is not None]
    return {
        "version": str(run_dir),
        "grounded": loaded.index is not None,
        "policy": loaded.reply_policy.mode,
        "replies": len(results),
        "wall_s": round(wall, 1),
        "first_text_ms_median": statistics.median(firsts) if firsts else None,
        "total_ms_median": statistics.median(r["total_ms"] for r in results),
        "sources": {s: sum(r["source"] == s for r in results) for s in {r["source"] for r in results}},
        "cut": sum(bool(r["cut"]) for r in results),
        "slot_leaks": sum(r["slot"] for r in results),
        "repeats": sum(r["repeats"] for r in results),
        "load_average": os.getloadavg()[0],
        "samples": results[: args.samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("dataset_dir")
    parser.add_argument("--limit", type=int, default=8, help="validation questions, asked at once")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--samples", type=int, default=3, help="replies printed in full")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
