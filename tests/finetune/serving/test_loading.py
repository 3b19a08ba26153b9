"""Loading a model for serving: GPT-2's Conv1D as Linear, int8 quantisation that still serves."""

from __future__ import annotations

import asyncio

from finetune.serving.batched import BatchedEngine
from finetune.serving.loading import conv1d_to_linear, quantize_int8
from tests.finetune.serving.engine_models import (
    QUESTIONS,
    collect,
    conversation,
    load,
    naive_replies,
    request,
    tiny_gpt2_dir,
    tiny_llama_dir,
)


def test_conv1d_to_linear_keeps_gpt2_outputs():
    import torch

    plain = load(tiny_gpt2_dir()).model
    converted = load(tiny_gpt2_dir()).model
    assert conv1d_to_linear(converted) == 8  # c_attn, c_proj, c_fc, c_proj in each of 2 layers
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, converted(ids).logits, atol=1e-5)


async def test_int8_model_quantises_every_linear_layer_and_serves():
    import torch

    loaded = load(tiny_gpt2_dir(), int8=True)
    quantised = [m for m in loaded.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantised) == 9  # 8 former Conv1D layers and lm_head
    assert loaded.int8
    conversations = [conversation(q) for q in QUESTIONS[:3]]
    want = await naive_replies(loaded, conversations, max_new_tokens=16)
    engine = BatchedEngine(loaded)
    try:
        got = await asyncio.gather(
            *(collect(engine, request(f"i{i}", m, max_new_tokens=16)) for i, m in enumerate(conversations))
        )
    finally:
        engine.close(timeout=10)
    for (_, g), w in zip(got, want, strict=True):
        assert g.token_count == w.token_count == 16
        assert g.text == w.text


def test_int8_on_llama_quantises_linear_layers():
    import torch

    model = quantize_int8(load(tiny_llama_dir()).model)
    quantised = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantised) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
