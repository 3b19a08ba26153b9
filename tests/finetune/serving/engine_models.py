"""Tiny models and helpers for the serving tests; the models are built once per test session.

A GPT-2 (``finetune.ml.tiny``, Conv1D layers, absolute positions) and a Llama-style
model (rotary positions, grouped-query attention, ``nn.Linear``) sharing the tiny
tokenizer, so both architectures the engine serves are exercised in seconds.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from finetune.ml.tiny import build_tiny_causal_lm
from finetune.serving.interface import GenerationDone, GenerationParams, GenerationRequest, TokenDelta
from finetune.serving.loading import LoadedModel, load_for_inference
from finetune.serving.naive import NaiveEngine

SYSTEM = {"role": "system", "content": "You are the support assistant of Acme. Answer briefly."}
QUESTIONS = (
    "Where is my order?",
    "I want a refund for the broken blender I bought last week, please.",
    "Hi",
    "Can I talk to a human? My password reset link expired twice.",
    "How do I cancel my subscription?",
)


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="sb-engine-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def tiny_gpt2_dir(seed: int = 0) -> Path:
    return build_tiny_causal_lm(_root() / f"gpt2-{seed}", seed=seed)


@functools.cache
def tiny_llama_dir() -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = _root() / "llama"
    shutil.copytree(tiny_gpt2_dir(), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2 uses
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def load(path: Path, label: str = "v1", **kwargs) -> LoadedModel:
    return load_for_inference(str(path), label=label, device="cpu", **kwargs)


def conversation(question: str, *history: str) -> list[dict[str, str]]:
    """System prompt, then alternating customer/agent ``history``, then ``question``."""
    turns = [SYSTEM]
    for i, text in enumerate(history):
        turns.append({"role": "customer" if i % 2 == 0 else "agent", "content": text})
    turns.append({"role": "customer", "content": question})
    return turns


def request(key: str, messages, **params) -> GenerationRequest:
    return GenerationRequest(key=key, messages=messages, params=GenerationParams(**params))


async def collect(engine, req: GenerationRequest) -> tuple[list[str], GenerationDone]:
    """Every delta and the final event of one stream; checks the stream's own contract."""
    deltas: list[str] = []
    done = None
    async for event in engine.stream(req):
        assert done is None, "no event may follow GenerationDone"
        if isinstance(event, TokenDelta):
            deltas.append(event.text)
        else:
            done = event
    assert done is not None, "every stream ends with GenerationDone"
    assert "".join(deltas) == done.text
    return deltas, done


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


async def naive_replies(loaded, messages_list, **params):
    naive = NaiveEngine(loaded)
    return [(await collect(naive, request(f"n{i}", m, **params)))[1] for i, m in enumerate(messages_list)]


def assert_same_reply(got: GenerationDone, want: GenerationDone) -> None:
    assert got.text == want.text
    assert got.token_count == want.token_count
    assert got.finish_reason == want.finish_reason
    assert got.mean_logprob == pytest.approx(want.mean_logprob, abs=1e-4)


LOOP_SENTENCE = "I can help you with that."
PLACEHOLDER_REPLY = "Please call us at {{Customer Support Phone Number}} for help."


@functools.cache
def looping_gpt2_dir() -> Path:
    """A tiny GPT-2 overfit on a reply that says one sentence over and over: a looping model."""
    corpus = ["Customer: Where is my order?\nAgent: " + " ".join([LOOP_SENTENCE] * 12)]
    return build_tiny_causal_lm(_root() / "looping", corpus=corpus, overfit_steps=120)


@functools.cache
def placeholder_gpt2_dir() -> Path:
    """A tiny GPT-2 overfit on a reply with template slots, as Bitext-trained models write them."""
    corpus = [f"Customer: Where is my order?\nAgent: {PLACEHOLDER_REPLY}"] * 2
    return build_tiny_causal_lm(_root() / "placeholders", corpus=corpus, overfit_steps=150)
