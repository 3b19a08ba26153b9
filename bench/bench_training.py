"""Training throughput and peak memory: this LoRA trainer vs a classic full fine-tune with transformers.Trainer.

Both train a randomly initialised GPT-2-small-shaped model (weights do not change
the speed) on the same random token data: examples whose lengths follow a
support-ticket-like distribution (log-normal, median ~45% of --seq-len, clipped to
[32, --seq-len]), the first ~40% of each being the customer's prompt.

- ``lora``: ``finetune.ml.training.fit`` with ``attach_lora``, i.e. the code behind
  ``train_lora``: LoRA r=16 on c_attn/c_proj, loss on the reply only (logits only
  there), length-grouped dynamic padding, bf16 autocast where the CPU has AMX (the
  trainer's "auto").
- ``full``: the classic recipe: ``transformers.Trainer``, all weights trained, fp32,
  examples padded to --seq-len, loss on every real token.
- ``full-grouped``: the same Trainer with dynamic padding and ``group_by_length``,
  to show how much of the difference is padding and how much is LoRA.

Each mode runs in its own subprocess, so its peak RSS (ru_maxrss) is its own.
Throughput counts useful (non-pad) tokens per second over the steps after
--warmup. Prints a JSON summary (and writes it to --json).

    python bench/bench_training.py                              # GPT-2-small, 20 steps, batch 4 x 256
    python bench/bench_training.py --layers 2 --steps 6 --seq-len 128 --json var/bench/training.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("lora", "full", "full-grouped")


def make_examples(n: int, seq_len: int, vocab: int, seed: int):
    from finetune.ml.prompting import IGNORE_INDEX
    from finetune.ml.training import Example

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = int(min(seq_len, max(32, rng.lognormvariate(math.log(seq_len * 0.45), 0.45))))
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = int(length * 0.4)
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "", "", ""))
    return examples


def build_model(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.seq_len),
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
    )
    model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    return model


def measured(step_seconds: list[float], step_tokens: list[int], warmup: int) -> dict:
    seconds, tokens = step_seconds[warmup:], step_tokens[warmup:]
    if not seconds:
        raise SystemExit(f"--steps must exceed --warmup ({warmup})")
    return {
        "measured_steps": len(seconds),
        "seconds": round(sum(seconds), 3),
        "useful_tokens": sum(tokens),
        "tokens_per_second": round(sum(tokens) / sum(seconds), 1),
    }


def run_lora(args) -> dict:
    import torch

    from finetune.ml.training import TrainConfig, _autocast_factory, attach_lora, device_and_precision, fit

    examples = make_examples(args.steps * args.batch_size, args.seq_len, args.vocab, args.seed)
    config = TrainConfig(
        base_model="random-gpt2",
        epochs=1.0,
        batch_size=args.batch_size,
        grad_accum_steps=1,
        max_length=args.seq_len,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        warmup_ratio=0.0,
        mixed_precision=args.mixed_precision,
        num_threads=args.threads,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    device, amp = device_and_precision(config)
    if device == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model = build_model(args).to(device)
    model, targets, trainable = attach_lora(model, config)
    stats = fit(model, examples, config, device=device, autocast=_autocast_factory(device, amp), pad_id=0)
    result = measured(stats.step_seconds, stats.step_tokens, args.warmup)
    result.update(
        {
            "device": device,
            "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "trainable_parameters": sum(p.numel() for _, p in trainable),
            "padding_fraction": round(1 - stats.tokens / stats.padded_tokens, 4),
            "gradient_checkpointing": config.gradient_checkpointing,
            "loss_first": round(stats.first_loss, 4),
            "loss_last": round(stats.last_loss, 4),
        }
    )
    return result


def run_trainer(args, grouped: bool) -> dict:
    import inspect
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune.ml.prompting import IGNORE_INDEX

    examples = make_examples(args.steps * args.batch_size, args.seq_len, args.vocab, args.seed)
    rows = []
    for e in examples:
        # The classic recipe: every real token is a label (causal LM on the whole text).
        rows.append({"input_ids": list(e.input_ids), "labels": list(e.input_ids)})

    def collate(batch):
        longest = max(len(r["input_ids"]) for r in batch) if grouped else args.seq_len
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    timer = Timer()
    model = build_model(args)
    # transformers 5 renamed group_by_length to a sampling strategy.
    if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters:
        grouping = {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    else:
        grouping = {"group_by_length": grouped}
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=5e-5,  # the usual full fine-tuning rate
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            **grouping,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate, callbacks=[timer])
        trainer.train()
    # Real tokens per step are not reported by the Trainer; every example is seen once, in an
    # order the sampler picks, so use the mean per step (exact over the whole run).
    mean_tokens = sum(len(e.input_ids) for e in examples) / args.steps
    result = measured(timer.seconds, [round(mean_tokens)] * len(timer.seconds), args.warmup)
    padded = (
        sum(len(e.input_ids) for e in examples) / (len(examples) * args.seq_len)
        if not grouped
        else None  # grouped: close to 1, not computed
    )
    result.update(
        {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "precision": "fp32",
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "padding_fraction": round(1 - padded, 4) if padded is not None else None,
        }
    )
    return result


def worker(args) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    started = time.perf_counter()
    if args.worker == "lora":
        result = run_lora(args)
    else:
        result = run_trainer(args, grouped=args.worker == "full-grouped")
    result["mode"] = args.worker
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per mode (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12, help="12 = GPT-2-small")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "no"], help="LoRA mode only")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LoRA mode only; the trainer's default is on",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all the process may use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    shared = ("steps", "warmup", "seq_len", "batch_size", "layers", "width", "heads", "vocab", "lora_r",
              "mixed_precision", "threads", "seed")  # fmt: skip
    passthrough = []
    for name in shared:
        value = getattr(args, name)
        if value is not None:
            passthrough += ["--" + name.replace("_", "-"), str(value)]
    passthrough.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    results = {}
    for mode in args.modes.split(","):
        command = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", mode]
        print(f"== {mode}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{mode} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        results[mode] = json.loads(lines[-1][len("RESULT ") :])
        print(json.dumps(results[mode]), file=sys.stderr, flush=True)

    summary = {
        "benchmark": "training",
        "model": f"GPT-2 architecture, {args.layers} layers x {args.width} wide, vocab {args.vocab}, random weights",
        "data": f"{args.steps * args.batch_size} random examples, lengths log-normal, <= {args.seq_len} tokens",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "cpu_count": len(os.sched_getaffinity(0)),
        "results": results,
    }
    if "lora" in results and "full" in results:
        lora, full = results["lora"], results["full"]
        summary["lora_vs_full"] = {
            "tokens_per_second_ratio": round(lora["tokens_per_second"] / full["tokens_per_second"], 2),
            "peak_rss_ratio": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 2),
            "target": "tokens/s ratio >= 1.5 and peak RSS ratio <= 0.5",
        }
        summary["lora_vs_full"]["meets_target"] = (
            summary["lora_vs_full"]["tokens_per_second_ratio"] >= 1.5
            and summary["lora_vs_full"]["peak_rss_ratio"] <= 0.5
        )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
