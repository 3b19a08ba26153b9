"""Check the trainer's CUDA path on a machine with a GPU: train_lora on a tiny GPT-2 must use CUDA and bf16,
make the loss fall, and write an adapter and a merged model that reload. Prints a JSON summary.

CI has no GPU, so the test suite cannot cover this path; run it by hand where one exists:

    python bench/check_cuda_training.py --json var/bench/cuda-check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXCHANGES = [
    ("Where is my order?", "Your order has shipped and arrives in two days."),
    ("How do I reset my password?", "Use the Forgot password link on the login page."),
    ("I want a refund.", "I am sorry to hear that. Refunds take five business days."),
    ("Can I talk to a human?", "Of course, an agent will join this chat shortly."),
    ("My card was charged twice.", "I have refunded the duplicate charge; it shows in three days."),
    ("Do you ship to Canada?", "Yes, we ship to Canada; delivery takes about a week."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from datasets import Dataset, DatasetDict

    from finetune.ml.tiny import build_tiny_causal_lm
    from finetune.ml.training import TrainConfig, train_lora

    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this check is for a GPU machine.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_causal_lm(tmp / "tiny", corpus=[f"Customer: {q}\nAgent: {a}" for q, a in EXCHANGES] * 4)
        conversations = [[{"role": "customer", "content": q}, {"role": "agent", "content": a}] for q, a in EXCHANGES]
        DatasetDict(
            {
                "train": Dataset.from_dict({"messages": conversations}),
                "validation": Dataset.from_dict({"messages": conversations[:2]}),
            }
        ).save_to_disk(str(tmp / "data"))
        config = TrainConfig(
            base_model=str(base), epochs=60, learning_rate=1e-2, lora_dropout=0.0, max_length=64, batch_size=4,
            grad_accum_steps=1, eval_generate_samples=2, eval_max_new_tokens=8,
        )  # fmt: skip
        started = time.perf_counter()
        result = train_lora(config, tmp / "data", tmp / "run")
        seconds = time.perf_counter() - started
        metrics = result.metrics
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).cuda()
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).cuda(), result.adapter_dir)
        summary = {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "device": metrics["device"],
            "mixed_precision": metrics["mixed_precision"],
            "train_loss_first": metrics["train_loss_first"],
            "train_loss_last": metrics["train_loss_last"],
            "eval_loss_before": metrics["before"]["eval_loss"],
            "eval_loss_after": metrics["eval_loss"],
            "seconds": round(seconds, 1),
            "merged_reloads_on": str(next(merged.parameters()).device),
            "adapter_reloads": type(adapter).__name__,
        }
        summary["ok"] = (
            summary["device"] == "cuda"
            and summary["mixed_precision"] == "bfloat16"
            and summary["train_loss_last"] < summary["train_loss_first"] - 0.25
            and summary["eval_loss_after"] < summary["eval_loss_before"]
        )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not summary["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
