"""Useful (non-pad) training tokens/s of ``finetune.ml.training.fit`` for SmolLM2 and GPT-2-small shapes, by setting.

Each configuration runs in its own subprocess (so OpenMP settings and peak RSS are its
own) on the same real examples: Bitext exchanges rendered with the model's tokenizer
(``--grounded`` adds two retrieved neighbours to each prompt, as the quality recipe
trains). SmolLM2 uses its real weights; GPT-2-small is randomly initialised from
``GPT2Config`` (weights do not change the speed) with the SmolLM2 tokenizer's ids
folded into its vocabulary.

Configurations (``--configs``, comma-separated):

- ``before``: what ``finetune.ml.training`` does today: LoRA r=16 on the attention
  projections of every layer, gradient checkpointing on, batch 8, OpenMP defaults.
- ``passive``: ``before`` with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep).
- ``no-ckpt``: ``passive`` without gradient checkpointing.
- ``top-half``: ``no-ckpt`` with LoRA on the top half of the layers only (backward stops there).
- ``one-thread``: ``no-ckpt`` on one thread.
- ``recipe``: the quick adapter's (``QUICK_RECIPE``): ``no-ckpt`` with LoRA on the top 8
  layers only and no dropout (run it with ``--batch-size 4 --grounded``).

Prints one JSON line per configuration: useful tokens/s over the measured steps, tokens
per CPU-second, padding share, peak RSS, and the machine's load average at the start.

    python bench/bench_training_shapes.py --model smollm2 --steps 4
    python bench/bench_training_shapes.py --model gpt2-small --configs before,no-ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "var/models/base/smollm2-135m-instruct"
DATASET = ROOT / "var/bench/quality/bitext-smollm2-135m-instruct"

CONFIGS = {
    "before": {"omp": None, "ckpt": True, "layers": 0, "threads": 0},
    "passive": {"omp": "PASSIVE", "ckpt": True, "layers": 0, "threads": 0},
    "no-ckpt": {"omp": "PASSIVE", "ckpt": False, "layers": 0, "threads": 0},
    "top-half": {"omp": "PASSIVE", "ckpt": False, "layers": -2, "threads": 0},
    "one-thread": {"omp": "PASSIVE", "ckpt": False, "layers": 0, "threads": 1},
    # The quick adapter's recipe (finetune.ml.training.QUICK_RECIPE): top 8 layers, no dropout.
    "recipe": {"omp": "PASSIVE", "ckpt": False, "layers": 8, "threads": 0, "dropout": 0.0},
}


def child(args) -> dict:
    import resource
    import time

    import torch

    from finetune.ml.training import TrainConfig, fit, load_tokenizer, prepare_examples

    spec = json.loads(args.child)
    torch.set_num_threads(spec["threads"] or len(os.sched_getaffinity(0)))
    tokenizer = load_tokenizer(str(args.base))
    from datasets import load_from_disk

    rows = list(load_from_disk(str(args.dataset / "train"))["messages"])
    n = args.steps * args.batch_size + args.batch_size
    if args.grounded:
        from finetune.ml.grounded_data import grounded_examples
        from finetune.ml.retrieval import RetrievalIndex

        index = RetrievalIndex.load(args.dataset / "retrieval")
        examples = grounded_examples(rows, index, tokenizer, max_length=args.max_length, limit=n, seed=1)
    else:
        examples, _ = prepare_examples(rows, tokenizer, max_length=args.max_length, limit=n, seed=1)
    if args.model == "smollm2":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=1024))
        targets = ["c_attn", "c_proj"]
    model.config.use_cache = False
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    first = layers // 2 if spec["layers"] == -2 else max(0, layers - spec["layers"]) if spec["layers"] > 0 else 0
    if spec["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=spec.get("dropout", 0.05),
            target_modules=targets,
            layers_to_transform=list(range(first, layers)),
            fan_in_fan_out=args.model != "smollm2",
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    config = TrainConfig(
        base_model="bench",
        epochs=1.0,
        batch_size=args.batch_size,
        grad_accum_steps=1,
        max_length=args.max_length,
        warmup_ratio=0.0,
        gradient_checkpointing=spec["ckpt"],
    )
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    stats = fit(model, examples, config, device="cpu", autocast=None, pad_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    measured_s, measured_t = stats.step_seconds[1:], stats.step_tokens[1:]  # the first step warms up
    return {
        "tokens_per_second": round(sum(measured_t) / max(sum(measured_s), 1e-9), 1),
        "tokens_per_cpu_second": round(stats.tokens / max(cpu, 1e-9), 1),
        "padding_fraction": round(1 - stats.tokens / max(1, stats.padded_tokens), 4),
        "mean_example_tokens": round(sum(len(e.input_ids) for e in examples) / len(examples), 1),
        "steps": stats.total_steps,
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "gpt2-small"), default="smollm2")
    parser.add_argument("--configs", default="before,passive,no-ckpt,top-half")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--grounded", action="store_true", help="grounded prompts (two neighbours each)")
    parser.add_argument("--base", type=Path, default=BASE)
    parser.add_argument("--dataset", type=Path, default=DATASET, help="built by bench/bench_quality.py")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))  # noqa: T201
        return 0
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("OMP_WAIT_POLICY", None)
        if spec["omp"]:
            env["OMP_WAIT_POLICY"] = spec["omp"]
        load = os.getloadavg()[0]
        command = [sys.executable, __file__, "--child", json.dumps(spec), *(argv or sys.argv[1:])]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            print(json.dumps({"config": name, "error": done.stderr[-2000:]}))  # noqa: T201
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps({"model": args.model, "config": name, "load_avg_1m": round(load, 2), **result}), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
