"""Grounded training on a tiny model: the prompts trained on are the prompts served, and a version carries its index.

The dataset is built by the project's dataset builder from the shipped sample tickets
(so it has ``retrieval/`` and ``intent/``); training copies both into the run directory
and records the grounding, decoding and reply-policy settings in train_config.json.
Serving builds prompts with ``grounding.ground_conversation`` from what
``knowledge.load_knowledge`` reads back from the version's merged directory.
"""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from finetune.ml.dataset_builder import BuildOptions, build_dataset, conversations_from_jsonl
from finetune.ml.grounded_data import own_positions
from finetune.ml.grounding import BLOCK_HEADER, ground_conversation
from finetune.ml.knowledge import load_knowledge
from finetune.ml.prompting import normalise_messages
from finetune.ml.training import TrainConfig, load_tokenizer, prepare_examples, train_lora
from tests.finetune.fixtures import SAMPLE_TICKETS

SYSTEM = "You are the customer support assistant of Acme."


@pytest.fixture(scope="module")
def grounded_dataset(tmp_path_factory, ticket_lm_dir):
    tokenizer = load_tokenizer(str(ticket_lm_dir))
    out = tmp_path_factory.mktemp("grounded") / "ds"
    options = BuildOptions(out_dir=out, tokenizer_name=str(ticket_lm_dir), system_prompt=SYSTEM, max_length=512)
    build_dataset(conversations_from_jsonl(SAMPLE_TICKETS), tokenizer, options)
    return out


@pytest.fixture(scope="module")
def grounded_run(tmp_path_factory, grounded_dataset, ticket_lm_dir):
    config = TrainConfig(
        base_model=str(ticket_lm_dir),
        epochs=1,
        max_examples=16,
        batch_size=4,
        grad_accum_steps=1,
        learning_rate=1e-3,
        grounded_max_length=512,
        prompt_budget=384,
        max_eval_examples=8,
        eval_generate_samples=4,
        eval_max_new_tokens=12,
        eval_before=False,
    )
    events = []
    result = train_lora(config, grounded_dataset, tmp_path_factory.mktemp("runs") / "run", events.append)
    return config, result, events


def test_training_prompts_are_the_serving_prompts(grounded_dataset, grounded_run, ticket_lm_dir):
    config, result, _ = grounded_run
    tokenizer = load_tokenizer(str(ticket_lm_dir))
    # What serving reads from the version's merged directory.
    knowledge = load_knowledge(result.merged_dir, strict=True)
    assert knowledge.grounded
    assert knowledge.grounding.max_prompt_tokens == 384
    assert knowledge.grounding.neighbours == config.grounding_neighbours
    data = load_from_disk(str(grounded_dataset))
    train_rows = list(data["train"]["messages"])[:12]
    val_rows = list(data["validation"]["messages"])[:6]

    train, _ = prepare_examples(
        train_rows,
        tokenizer,
        max_length=config.grounded_max_length,
        index=knowledge.index,
        grounding=knowledge.grounding,
        exclude_self=True,
    )
    validation, _ = prepare_examples(
        val_rows, tokenizer, max_length=config.grounded_max_length, index=knowledge.index, grounding=knowledge.grounding
    )
    assert len(train) == len(train_rows)
    assert len(validation) == len(val_rows)

    positions = own_positions(train_rows, knowledge.index)
    assert None not in positions  # every training row is in the index (built from the train split)
    grounded_somewhere = 0
    for rows, examples, excludes in ((train_rows, train, positions), (val_rows, validation, [None] * len(val_rows))):
        for raw, example, own in zip(rows, examples, excludes, strict=True):
            turns = normalise_messages(raw)
            served, hits = ground_conversation(
                turns[:-1],
                knowledge.index,
                tokenizer,
                config=knowledge.grounding,
                max_prompt_tokens=knowledge.grounding.max_prompt_tokens,
                exclude=own,
            )
            assert example.prompt == served.text
            grounded_somewhere += bool(served.used)
            # Never grounded on itself: its own exchange is not among the neighbours shown.
            if own is not None:
                assert own not in {h.position for h in served.used}
                assert own not in {h.position for h in hits}
    assert grounded_somewhere >= len(train_rows) // 2
    assert any(BLOCK_HEADER in e.prompt for e in train)


def test_a_grounded_version_carries_its_index_classifier_and_settings(grounded_run):
    config, result, events = grounded_run
    saved = json.loads((result.output_dir / "train_config.json").read_text())
    assert saved["grounding"]["neighbours"] == 2
    assert saved["grounding"]["prime"] is True
    assert saved["decoding"]["no_repeat_ngram_size"] == 6
    assert saved["reply_policy"]["mode"] == "consensus"
    assert (result.output_dir / "retrieval" / "index.json").exists()
    assert (result.output_dir / "intent" / "intent.json").exists()
    metrics = result.metrics
    assert metrics["grounded"] is True
    quality = metrics["quality"]
    assert quality["grounded"] is True
    assert quality["intent_classifier"] is True
    rows = quality["rows"]
    assert set(rows) == {"candidate", "retrieval", "retrieval-consensus"}
    for row in rows.values():
        assert row["n"] == 4
        assert 0.0 <= row["rouge_l"] <= 1.0
        assert 0.0 <= row["intent_accuracy"] <= 1.0
        assert row["slot_leaks"] == 0  # every reply passed the placeholder filler
        assert len(row["examples"]) == 4
    candidate = rows["candidate"]
    assert candidate["model_replies"] + candidate["retrieved"] + candidate["handoffs"] == 4
    # Evaluation progress reached the run's listener reply by reply.
    progress = [(e.done, e.total) for e in events if e.phase == "evaluating_after" and e.total]
    assert progress[0] == (0, 4)
    assert progress[-1] == (4, 4)
    assert any("Evaluating the fine-tuned model: 4/4 replies" in e.message for e in events)


def test_an_ungrounded_config_keeps_the_plain_prompt(grounded_dataset, tmp_path, ticket_lm_dir):
    config = TrainConfig(
        base_model=str(ticket_lm_dir),
        epochs=0.25,
        max_examples=8,
        batch_size=4,
        grad_accum_steps=1,
        grounding_neighbours=0,
        max_length=256,
        max_eval_examples=4,
        eval_generate_samples=2,
        eval_max_new_tokens=4,
        eval_before=False,
        merge=False,
    )
    result = train_lora(config, grounded_dataset, tmp_path / "run")
    knowledge = load_knowledge(result.adapter_dir)
    assert not knowledge.grounded  # no index copied: serving stays ungrounded like training
    assert knowledge.classifier is not None  # the gate still scores intents
    assert json.loads((result.output_dir / "train_config.json").read_text())["grounding"] is None
    assert result.metrics["quality"]["grounded"] is False
    assert result.metrics["quality"]["rows"]["retrieval"]["n"] == 2
