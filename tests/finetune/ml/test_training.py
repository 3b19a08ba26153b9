"""The LoRA trainer on a tiny local GPT-2: plain Python, no database."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.ml.prompting import IGNORE_INDEX
from finetune.ml.training import (
    DatasetError,
    Example,
    TrainConfig,
    TrainingCancelled,
    collate,
    length_grouped_batches,
    lora_targets,
    train_lora,
)
from tests.finetune.fixtures import EXCHANGES, conversation, write_dataset


def overfit_config(base, **overrides) -> TrainConfig:
    values = {
        "base_model": str(base),
        "epochs": 60,
        "learning_rate": 1e-2,
        "lora_dropout": 0.0,
        "max_length": 64,
        "batch_size": 4,
        "grad_accum_steps": 1,
        "eval_generate_samples": 2,
        "eval_max_new_tokens": 8,
    }
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_falls_only_lora_weights_change_and_adapter_reloads(tiny_base, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    few = [conversation(q, a) for q, a in EXCHANGES[:4]]
    data = write_dataset(tmp_path / "data", few, few[:2], tiny_tokenizer)
    events = []
    result = train_lora(overfit_config(tiny_base), data, tmp_path / "run", events.append)
    metrics = result.metrics

    # Overfitting four examples: the training loss and the loss on (seen) validation examples fall.
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.25
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"] - 0.2
    assert metrics["perplexity"] == pytest.approx(torch.exp(torch.tensor(metrics["eval_loss"])).item(), rel=1e-4)
    assert metrics["loss_history"]
    assert metrics["loss_history"][-1]["step"] == metrics["optimizer_steps"]

    # Progress went from 0 to 1 through every phase, and steps were reported.
    assert events[-1].phase == "done"
    assert events[-1].progress == 1.0
    assert [e.progress for e in events] == sorted(e.progress for e in events)
    assert {"loading", "evaluating_before", "training", "evaluating_after", "saving"} <= {e.phase for e in events}
    assert max(e.step for e in events) == metrics["optimizer_steps"]

    # The adapter holds only LoRA weights (safetensors), and the base weights are untouched.
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter
    assert all("lora_" in key for key in adapter)
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at zero
    assert json.loads((result.adapter_dir / "metrics.json").read_text())["eval_loss"] == metrics["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed, "merging changed nothing"
    assert all(k.endswith(("c_attn.weight", "c_proj.weight")) for k in changed), changed
    assert not any("wte" in k or "ln_" in k or "c_fc" in k for k in changed)

    # The adapter reloads on a fresh base and generates the same greedy text as the merged export.
    prompt = tiny_tokenizer("Customer: Where is my order?\nAgent:", return_tensors="pt")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), result.adapter_dir)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tiny_tokenizer.eos_token_id}
    from_adapter = reloaded.eval().generate(**prompt, **kwargs)
    from_merged = merged.eval().generate(**prompt, **kwargs)
    assert from_adapter.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(from_adapter, from_merged)


def test_metrics_compare_with_retrieval_baseline(tiny_base, dataset_dir, tmp_path):
    result = train_lora(overfit_config(tiny_base, epochs=2), dataset_dir, tmp_path / "run")
    metrics = result.metrics
    assert metrics["num_train"] == 8
    assert metrics["num_validation"] == 4
    assert 0.0 <= metrics["rouge_l"] <= 1.0
    assert 0.0 <= metrics["rouge_l_retrieval"] <= 1.0
    sample = metrics["samples"][0]
    assert set(sample) == {"question", "reference", "model", "source", "retrieval"}
    assert sample["retrieval"] in {a for _, a in EXCHANGES[:8]}  # lookup answers with a training reply
    # An old dataset (no retrieval index saved with it): the model is evaluated ungrounded, its
    # words always go out, and the retrieval baseline is built from the train split on the fly.
    quality = metrics["quality"]
    assert quality["grounded"] is False
    assert set(quality["rows"]) == {"base", "candidate", "retrieval", "retrieval-consensus"}
    candidate = quality["rows"]["candidate"]
    assert candidate["n"] == quality["examples"] == 2
    assert candidate["retrieved"] == 0  # no index, no past answer can go out
    assert candidate["model_replies"] + candidate["handoffs"] == 2  # the unsure tiny model hands off
    assert candidate["rouge_l"] == metrics["rouge_l"]
    assert quality["rows"]["retrieval"]["rouge_l"] == metrics["rouge_l_retrieval"]
    assert candidate["intent_accuracy"] is None  # no classifier without intents
    assert metrics["padding_fraction"] < 0.5
    assert (result.output_dir / "metrics.json").exists()


def test_corrupt_dataset_fails_with_a_clear_error(tiny_base, dataset_dir, tmp_path):
    for arrow in dataset_dir.glob("train/*.arrow"):
        arrow.write_bytes(b"this is not an arrow file")
    with pytest.raises(DatasetError, match="cannot be read.*build_dataset"):
        train_lora(overfit_config(tiny_base), dataset_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_and_unusable_datasets_are_refused(tiny_base, tiny_tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        train_lora(overfit_config(tiny_base), tmp_path / "nowhere", tmp_path / "run")
    only_customers = [[{"role": "customer", "content": "hello?"}]] * 3
    data = write_dataset(tmp_path / "bad", only_customers, [], None)
    with pytest.raises(DatasetError, match="None of the 3 training conversations"):
        train_lora(overfit_config(tiny_base), data, tmp_path / "run")


def test_should_stop_cancels_without_saving(tiny_base, dataset_dir, tmp_path):
    steps = []

    def on_progress(event):
        if event.phase == "training" and event.step:
            steps.append(event.step)

    with pytest.raises(TrainingCancelled):
        train_lora(
            overfit_config(tiny_base), dataset_dir, tmp_path / "run", on_progress, should_stop=lambda: len(steps) >= 2
        )
    assert steps == [1, 2]
    assert not (tmp_path / "run").exists()


def test_length_grouped_batches_cut_padding():
    lengths = [5, 200, 7, 180, 6, 190, 8, 170] * 8
    grouped = length_grouped_batches(lengths, 4, seed=1)
    assert sorted(i for batch in grouped for i in batch) == list(range(len(lengths)))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    in_order = [list(range(i, i + 4)) for i in range(0, len(lengths), 4)]
    assert padding(grouped) < padding(in_order) / 5
    assert grouped != length_grouped_batches(lengths, 4, seed=2)  # shuffled per epoch seed


def test_collate_pads_right_and_masks_padding():
    batch = collate(
        [Example([1, 2, 3], [IGNORE_INDEX, 2, 3], "", "", ""), Example([4], [4], "", "", "")], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_config_overrides_are_checked():
    config = TrainConfig.from_overrides({"epochs": "2", "lora_r": 8, "max_examples": None})
    assert (config.epochs, config.lora_r, config.max_examples) == (2.0, 8, None)
    with pytest.raises(ValueError, match="lora_r=0 is outside"):
        TrainConfig.from_overrides({"lora_r": 0})
    with pytest.raises(ValueError, match="Unknown training settings: colour"):
        TrainConfig.from_overrides({"colour": "blue"})
    with pytest.raises(ValueError, match="wrong type"):
        TrainConfig.from_overrides({"lora_r": 2.5})


def test_lora_targets_by_architecture():
    assert lora_targets("gpt2", None) == (["c_attn", "c_proj"], True)
    assert lora_targets("llama", None) == (["q_proj", "k_proj", "v_proj", "o_proj"], False)
    assert lora_targets("llama", ["q_proj"]) == (["q_proj"], False)


def test_llama_style_base_trains_through_its_chat_template(tmp_path):
    """A Llama-architecture base with a chat template (the shape of SmolLM2) trains and merges."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.finetune.fixtures import EXCHANGES as exchanges

    base = tmp_path / "tiny-llama"
    gpt2_tokenizer_dir = tmp_path / "tok"
    from finetune.ml.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(gpt2_tokenizer_dir, corpus=[f"{q} {a}" for q, a in exchanges] * 3, vocab_size=384)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
    )
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)
    shutil.rmtree(gpt2_tokenizer_dir)
    conversations = [conversation(q, a) for q, a in exchanges]
    data = write_dataset(tmp_path / "data", conversations[:6], conversations[6:8], tokenizer)

    result = train_lora(overfit_config(base, epochs=2), data, tmp_path / "run")
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any("q_proj.lora_A" in k for k in adapter)
    assert any("o_proj.lora_B" in k for k in adapter)
    assert result.metrics["eval_loss"] is not None
    assert (result.merged_dir / "config.json").exists()


def test_the_demo_trains_the_quick_recipe():
    """scripts/demo.d/20-finetune.sh passes QUICK_RECIPE as options (checkpointing goes off with lora_layers)."""
    import re

    from finetune.ml.training import QUICK_RECIPE
    from tests.conftest import ROOT

    config = TrainConfig.from_overrides(QUICK_RECIPE)
    assert config.lora_layers == 8
    assert config.gradient_checkpointing is False
    script = (ROOT / "scripts" / "demo.d" / "20-finetune.sh").read_text()
    options = dict(re.findall(r"--([a-z-]+) ([0-9.e-]+)", script))
    for name, value in QUICK_RECIPE.items():
        if name == "gradient_checkpointing":
            continue  # not an option: off by itself with lora_layers (attach_lora)
        assert float(options[name.replace("_", "-")]) == pytest.approx(float(value)), name
