"""LoRA on the top layers only (TrainConfig.lora_layers): adapters only there, and training still learns."""

from __future__ import annotations

import pytest

from finetune.ml.training import TrainConfig, attach_lora, fit, prepare_examples


@pytest.fixture
def tiny_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.ml.tiny import build_tiny_causal_lm

    path = build_tiny_causal_lm(tmp_path / "tiny", n_layer=3)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_top_layers_only_get_adapters_and_learn(tiny_model):
    model, tokenizer = tiny_model
    config = TrainConfig(
        base_model="tiny", lora_layers=1, epochs=6, batch_size=2, grad_accum_steps=1, learning_rate=5e-3
    )
    conversations = [
        [{"role": "customer", "content": "Where is my order?"}, {"role": "agent", "content": "It ships today."}],
        [{"role": "customer", "content": "I want a refund."}, {"role": "agent", "content": "Refunds take 5 days."}],
    ]
    examples, _ = prepare_examples(conversations, tokenizer, max_length=64)

    model, _, trainable = attach_lora(model, config)
    stats = fit(model, examples, config, device="cpu", autocast=None, pad_id=tokenizer.pad_token_id)

    layers = {name.split(".h.")[1].split(".")[0] for name, _ in trainable}
    assert layers == {"2"}  # the top one of three
    assert stats.last_loss < stats.first_loss


def test_lora_layers_is_range_checked():
    with pytest.raises(ValueError, match="lora_layers=0"):
        TrainConfig.from_overrides({"lora_layers": 0})
