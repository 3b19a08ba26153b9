"""A version's knowledge (index, intent classifier, grounding/decoding/policy settings) loads from its dirs."""

from __future__ import annotations

import json

import pytest

from finetune.ml.decoding import DecodingConfig
from finetune.ml.grounding import GroundingConfig
from finetune.ml.intent import IntentClassifier
from finetune.ml.knowledge import copy_knowledge, load_knowledge
from finetune.ml.reply_policy import ReplyPolicyConfig
from finetune.ml.retrieval import Exchange, RetrievalIndex, RetrievalIndexError

EXCHANGES = [
    Exchange("where is my parcel", "Track it under Orders.", "track_order", "ticket:t:1"),
    Exchange("i want my money back", "Refunds take five days.", "get_refund", "ticket:t:2"),
]


@pytest.fixture
def run_dir(tmp_path):
    dataset = tmp_path / "dataset"
    RetrievalIndex.build(EXCHANGES).save(dataset / "retrieval")
    IntentClassifier.train([e.reply for e in EXCHANGES], [e.intent for e in EXCHANGES]).save(dataset / "intent")
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "adapter").mkdir()
    assert copy_knowledge(dataset, run) == ["retrieval", "intent"]
    (run / "train_config.json").write_text(
        json.dumps(
            {
                "lora_r": 16,
                "grounding": {"neighbours": 3, "answer_tokens": 100},
                "decoding": {"no_repeat_ngram_size": 5},
                "reply_policy": {"mode": "fallback"},
            }
        )
    )
    return run


def test_loads_from_the_run_merged_or_adapter_directory(run_dir):
    for path in (run_dir, run_dir / "merged", run_dir / "adapter"):
        knowledge = load_knowledge(path)
        assert knowledge.root == run_dir
        assert knowledge.grounded
        assert knowledge.index.search("parcel where", k=1)[0].exchange.origin == "ticket:t:1"
        assert knowledge.classifier.predict(["Refunds take five days."]) == ["get_refund"]
        assert knowledge.grounding == GroundingConfig(neighbours=3, answer_tokens=100)
        assert knowledge.decoding == DecodingConfig(no_repeat_ngram_size=5)
        assert knowledge.policy == ReplyPolicyConfig(mode="fallback")


def test_an_old_version_without_knowledge_loads_as_none(tmp_path):
    old = tmp_path / "old"
    (old / "merged").mkdir(parents=True)
    (old / "train_config.json").write_text(json.dumps({"lora_r": 8}))
    knowledge = load_knowledge(old / "merged")
    assert not knowledge.grounded
    assert (knowledge.classifier, knowledge.grounding, knowledge.decoding, knowledge.policy) == (None,) * 4
    assert knowledge.grounding_or_default == GroundingConfig()
    assert knowledge.policy_or_default == ReplyPolicyConfig()
    assert load_knowledge(None).index is None


def test_a_broken_index_is_left_out_unless_strict(run_dir):
    (run_dir / "retrieval" / "matrix.npz").write_bytes(b"not an npz")
    assert load_knowledge(run_dir).index is None
    with pytest.raises(RetrievalIndexError):
        load_knowledge(run_dir, strict=True)
