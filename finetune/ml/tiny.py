"""Build a small GPT-2-architecture causal LM with its own tokenizer, fully offline.

Tests and benchmarks cannot download weights, so they build a model here: a
byte-level BPE tokenizer trained on a few texts, and a randomly initialised GPT-2
of any size (two layers for tests, GPT-2-small's shape for benchmarks). The
result is an ordinary Hugging Face directory that every loader in the project
accepts as a base model (``SUPPORTBOT_BASE_MODEL=/path/to/dir``).

``build_tiny_llama`` does the same for a Llama-architecture model (the family of
SmolLM2), which vLLM serves with LoRA adapters; ``build_tiny_lora_adapter`` trains a
LoRA adapter for it on other texts, so the adapter visibly changes what it says.

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
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    tokenizer = _bpe_tokenizer(out, corpus, vocab_size, n_positions)

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
        _overfit(model, tokenizer, corpus, overfit_steps)
    model.save_pretrained(out)
    return out


def _bpe_tokenizer(out: Path, corpus: list[str], vocab_size: int, max_length: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=min(vocab_size, 4096), min_frequency=1, special_tokens=[EOS])
    bpe.save(str(out / "bpe.json"))
    tokenizer = GPT2TokenizerFast(
        tokenizer_file=str(out / "bpe.json"), bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=max_length
    )
    tokenizer.pad_token = EOS
    tokenizer.save_pretrained(out)
    (out / "bpe.json").unlink()
    return tokenizer


def build_tiny_llama(
    out_dir: str | Path,
    corpus: Iterable[str] = _DEFAULT_CORPUS,
    *,
    vocab_size: int = 512,
    n_layer: int = 2,
    hidden_size: int = 128,  # two heads of 64: a head size vLLM's CPU attention kernels support
    n_head: int = 2,
    max_positions: int = 512,
    seed: int = 0,
    overfit_steps: int = 0,
) -> Path:
    """Write a tokenizer and a small LlamaForCausalLM (fp32 safetensors) to ``out_dir``.

    As ``build_tiny_causal_lm``; the tokenizer is the same byte-level BPE, so the chat
    renders its plain ``Customer:``/``Agent:`` prompt for it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus)
    tokenizer = _bpe_tokenizer(out, corpus, vocab_size, max_positions)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    if overfit_steps:
        _overfit(model, tokenizer, corpus, overfit_steps)
    model.save_pretrained(out)
    return out


def build_tiny_lora_adapter(
    base_dir: str | Path, out_dir: str | Path, corpus: Iterable[str], *, r: int = 8, steps: int = 60, seed: int = 1
) -> Path:
    """Train a LoRA adapter (q/k/v/o projections) of the model in ``base_dir`` on ``corpus`` and save it.

    A few seconds of real LoRA steps on a tiny model, enough for the adapter to say
    what ``corpus`` says instead of what the base learnt: what a test of "the new
    version answers" needs. The base's tokenizer is saved with it, as the trainer
    saves an adapter version.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    corpus = list(corpus)
    if steps and corpus:  # none: an adapter that changes nothing (PEFT starts B at zero)
        _overfit(peft_model, tokenizer, corpus, steps, lr=1e-2)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _overfit(model, tokenizer, corpus: list[str], steps: int, lr: float = 3e-3) -> None:
    import torch

    batch = tokenizer([text + EOS for text in corpus], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


if __name__ == "__main__":
    print(build_tiny_causal_lm(sys.argv[1] if len(sys.argv) > 1 else "var/tiny-gpt2"))  # noqa: T201
