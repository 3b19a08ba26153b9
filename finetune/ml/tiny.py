"""Build a small GPT-2-architecture causal LM with its own tokenizer, fully offline.

Tests and benchmarks cannot download weights, so they build a model here: a
byte-level BPE tokenizer trained on a few texts, and a randomly initialised GPT-2
of any size (two layers for tests, GPT-2-small's shape for benchmarks). The
result is an ordinary Hugging Face directory that every loader in the project
accepts as a base model (``SUPPORTBOT_BASE_MODEL=/path/to/dir``).

    python -m finetune.ml.tiny /tmp/tiny-gpt2
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
_DEFAULT_CORPUS = (
    "Customer: Where is my order?\nAgent: Your order has shipped and arrives in two days.",
    "Customer: How do I reset my password?\nAgent: Use the Forgot password link on the login page.",
    "Customer: I want a refund.\nAgent: I am sorry to hear that. Refunds take five business days.",
    "Customer: Can I talk to a human?\nAgent: Of course, an agent will join this chat shortly.",
)


def build_tiny_causal_lm(
    out_dir: str | Path,
    corpus: Iterable[str] = _DEFAULT_CORPUS,
    *,
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 512,
    seed: int = 0,
    overfit_steps: int = 0,
) -> Path:
    """Write a tokenizer and a randomly initialised GPT2LMHeadModel to ``out_dir``.

    ``vocab_size`` is the model's embedding size; the tokenizer learns at most that
    many tokens from ``corpus`` (fewer on a small corpus, which is fine).
    ``overfit_steps`` > 0 first trains the model on ``corpus`` (full fine-tune, a second
    or two), so it writes words and spaces like a real model rather than random tokens:
    what tests of streaming and safety filtering need.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(corpus), vocab_size=min(vocab_size, 4096), min_frequency=1, special_tokens=[EOS])
    bpe.save(str(out / "bpe.json"))
    tokenizer = GPT2TokenizerFast(
        tokenizer_file=str(out / "bpe.json"),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=n_positions,
    )
    tokenizer.pad_token = EOS
    tokenizer.save_pretrained(out)
    (out / "bpe.json").unlink()

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=max(vocab_size, len(tokenizer)),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    if overfit_steps:
        _overfit(model, tokenizer, list(corpus), overfit_steps)
    model.save_pretrained(out)
    return out


def _overfit(model, tokenizer, corpus: list[str], steps: int) -> None:
    import torch

    batch = tokenizer([text + EOS for text in corpus], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


if __name__ == "__main__":
    print(build_tiny_causal_lm(sys.argv[1] if len(sys.argv) > 1 else "var/tiny-gpt2"))  # noqa: T201
