"""int8 dynamic quantisation: does it keep the model's quality, and how much faster does it decode?

Perplexity of the agents' replies in Bitext exchanges (the loss the fine-tuning
minimises: reply tokens only, rendered with the training template), fp32 against
int8 (``finetune.serving.loading.quantize_int8``), plus single-stream decode speed and prefill
time of both. The default model is the bundled SmolLM2-135M-Instruct (real weights,
offline); ``--model-dir`` takes any served model directory, e.g. a merged GPT-2
version (its Conv1D layers are converted to Linear first).

    .venv/bin/python bench/bench_int8.py                          # SmolLM2, 100 exchanges
    .venv/bin/python bench/bench_int8.py --model-dir var/models/v3/merged --examples 300

Prints a JSON summary (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import SYSTEM_PROMPT, load_exchanges  # noqa: E402
from finetune.ml.prompting import render_example, tokenize_example  # noqa: E402
from finetune.serving.loading import load_for_inference  # noqa: E402


def default_model_dir() -> Path:
    from finetune.ml.base_model import convert_bundled

    return convert_bundled(ROOT / "var" / "models")


def reply_perplexity(loaded, examples: list[dict[str, list[int]]]) -> tuple[float, int]:
    """exp(mean negative log-likelihood of the reply tokens), and how many tokens that covers."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            logits = loaded.model(input_ids=ids).logits[:, :-1, :].float()
            target = labels[:, 1:]
            keep = target != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total += float(nll)
            count += int(keep.sum())
    return math.exp(total / count), count


def speed(loaded, prompt_ids: list[int], new_tokens: int) -> dict[str, float]:
    """Prefill time of one prompt and greedy single-stream decode speed (KV cache)."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        for _ in range(3):
            loaded.model(input_ids=ids)
        prefill = (time.perf_counter() - start) / 3
        start = time.perf_counter()
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        elapsed = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    return {"prefill_ms": round(prefill * 1000, 1), "decode_tokens_per_s": round(generated / (elapsed - prefill), 1)}


def main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    exchanges, source = load_exchanges(args.examples, args.seed)
    results = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        loaded = load_for_inference(str(model_dir), label=name, device="cpu", int8=int8)
        examples = [
            tokenize_example(
                render_example(
                    [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "customer", "content": q},
                        {"role": "agent", "content": a},
                    ],
                    loaded.tokenizer,
                ),
                loaded.tokenizer,
                max_length=args.max_length,
            )
            for q, a in exchanges
        ]
        ppl, tokens = reply_perplexity(loaded, examples)
        prompt = examples[0]["input_ids"][: args.prompt_tokens]
        results[name] = {"reply_perplexity": round(ppl, 3), "reply_tokens": tokens, **speed(loaded, prompt, 64)}
        print(json.dumps({name: results[name]}), file=sys.stderr)
    change = results["int8"]["reply_perplexity"] / results["fp32"]["reply_perplexity"] - 1
    return {
        "benchmark": "int8 dynamic quantisation",
        "model_dir": str(model_dir),
        "data": f"{source}, {len(exchanges)} exchanges, replies only, max {args.max_length} tokens",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        **results,
        "perplexity_change_pct": round(change * 100, 2),
        "decode_speedup": round(results["int8"]["decode_tokens_per_s"] / results["fp32"]["decode_tokens_per_s"], 2),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    summary = main(arguments)
    text = json.dumps(summary, indent=2)
    print(text)
    if arguments.json:
        Path(arguments.json).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.json).write_text(text + "\n")
