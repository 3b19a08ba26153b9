"""The dataset builder (plain Python): masks, redaction, deduplication, truncation, split, card."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from finetune.ml.dataset_builder import (
    BuildOptions,
    SourceConversation,
    build_dataset,
    conversations_from_jsonl,
    stratified_split,
)
from finetune.ml.prompting import IGNORE_INDEX, render_example
from finetune.ml.redaction import CustomerFields, find_pii

SYSTEM = "You are the customer support assistant of Acme."


def build(conversations, tokenizer, out: Path, **options):
    return build_dataset(conversations, tokenizer, BuildOptions(out_dir=out, tokenizer_name="tiny", **options))


def conv(origin, *turns, intent="track_order", customer=None, tags=("B",)):
    roles = ["customer", "agent"] * len(turns)
    return SourceConversation(
        origin=origin,
        messages=[{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)],
        intent=intent,
        category="ORDER",
        tags=list(tags),
        customer=customer,
    )


def assert_masks_cover_only_the_reply(dataset, tokenizer):
    for row in dataset:
        labels, ids = row["labels"], row["input_ids"]
        assert len(labels) == len(ids) == len(row["attention_mask"])
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        # Everything before the reply is masked, everything from it on is learned, as the ids.
        assert all(label == IGNORE_INDEX for label in labels[:first])
        assert labels[first:] == ids[first:]
        # The learned tokens are exactly the completion: the reply and its end marker.
        assert tokenizer.decode(ids[first:]) == row["completion"]
        assert tokenizer.decode(ids[:first]) == row["prompt"]
        assert row["completion"].strip().startswith(row["messages"][-1]["content"][:20])
        assert row["messages"][-1]["role"] == "agent"


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory, ticket_tokenizer):
    from tests.finetune.fixtures import SAMPLE_TICKETS

    out = tmp_path_factory.mktemp("build") / "ds"
    summary = build(conversations_from_jsonl(SAMPLE_TICKETS), ticket_tokenizer, out, system_prompt=SYSTEM, seed=3)
    return summary


def test_saved_dataset_loads_with_every_column(sample_build):
    data = load_from_disk(str(sample_build.path))
    assert set(data) == {"train", "validation"}
    assert data["train"].num_rows == sample_build.num_train > 250
    assert data["validation"].num_rows == sample_build.num_validation > 20
    assert set(data["train"].column_names) == {
        "messages",
        "prompt",
        "completion",
        "input_ids",
        "attention_mask",
        "labels",
        "intent",
        "category",
        "tags",
        "segment",
        "origin",
    }
    row = data["train"][0]
    assert row["messages"][0] == {"role": "system", "content": SYSTEM}
    assert row["origin"].startswith("ticket:file:S-")
    assert row["segment"] in {"free", "pro", "enterprise"}


def test_masks_cover_only_the_reply_plain_template(sample_build, ticket_tokenizer):
    data = load_from_disk(str(sample_build.path))
    assert_masks_cover_only_the_reply(data["train"], ticket_tokenizer)
    row = data["train"][0]
    assert row["prompt"].startswith(f"System: {SYSTEM}\nCustomer: ")
    assert row["prompt"].endswith("Agent:")
    assert row["completion"].endswith("<|endoftext|>")


def test_masks_cover_only_the_reply_chat_template(tmp_path, ticket_chat_tokenizer, sample_tickets):
    conversations = list(conversations_from_jsonl(sample_tickets))[:40]
    summary = build(conversations, ticket_chat_tokenizer, tmp_path / "ds", system_prompt=SYSTEM)
    data = load_from_disk(str(summary.path))
    assert summary.card["template"] == "chat"
    assert_masks_cover_only_the_reply(data["train"], ticket_chat_tokenizer)
    row = data["train"][0]
    assert row["prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["completion"].endswith("<|im_end|>\n")


def test_no_customer_detail_is_written(sample_build, sample_tickets):
    data = load_from_disk(str(sample_build.path))
    written = "\n".join(
        json.dumps(row["messages"]) + row["prompt"] + row["completion"] for split in data.values() for row in split
    )
    for line in sample_tickets.read_text().splitlines():
        ticket = json.loads(line)
        for value in (ticket["customer_email"], ticket["customer_phone"], ticket["customer_address"]):
            assert value not in written
        assert ticket["customer_identifiers"][0]["value"] not in written
    assert "4111 1111 1111 1111" not in written
    assert "GB82 WEST" not in written
    assert "{{EMAIL}}" in written
    assert "{{ORDER_ID}}" in written
    assert "{{NAME}}" in written
    for split in data.values():
        for row in split:
            for message in row["messages"]:
                assert not find_pii(message["content"])


def test_card_describes_the_dataset(sample_build):
    card = json.loads((sample_build.path / "card.json").read_text())
    assert card == json.loads(json.dumps(sample_build.card))
    assert card["num_train"] == sample_build.num_train
    assert card["conversations_seen"] == 330
    assert sum(card["dropped"].values()) + card["num_train"] + card["num_validation"] == 330
    # The sample file hides two e-mail addresses from the pattern ("[at]", "(at)"): dropped, not written.
    assert card["dropped"]["pii_after_redaction"] == 2
    assert card["redactions"]["EMAIL"] > 10
    assert card["redactions"]["ORDER_ID"] > 100
    assert sum(card["counts"]["total"]["intent"].values()) == card["num_train"] + card["num_validation"]
    assert set(card["counts"]["total"]["tag"]) >= {"P", "Q", "Z", "K"}
    assert set(card["counts"]["total"]["segment"]) == {"free", "pro", "enterprise"}
    assert card["counts"]["validation"]["intent"]
    lengths = card["token_lengths"]["input"]
    assert 0 < lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"]
    assert card["token_lengths"]["reply"]["p50"] > 0
    assert len(card["content_hash"]) == 64
    assert card["tokenizer"] == "tiny"
    assert card["template"] == "plain"
    readme = (sample_build.path / "README.md").read_text()
    assert card["content_hash"] in readme
    assert "Dropped by reason" in readme
    assert "pii_after_redaction" in readme


def test_duplicates_empty_and_unanswered_conversations_are_dropped(tmp_path, ticket_tokenizer):
    conversations = [
        conv("t:1", "Where is my order?", "It ships today."),
        conv("t:2", "Where is my order?", "It ships today."),  # exact duplicate
        conv("t:3", "where is my   ORDER", "It ships today!"),  # duplicate once normalised
        conv("t:4", "Hello?"),  # no agent turn
        conv("t:5", "Hi", "   "),  # empty reply
        SourceConversation(origin="t:6", messages=[{"role": "agent", "content": "We are closed on Sunday."}]),
        # Trailing customer turns have no reply to learn: the last agent turn is the target.
        conv("t:7", "Can I pay by card?", "Yes, all major cards.", "Thanks!"),
        conv("t:8", "Mail me at jane [at] example [dot] com", "Sure."),
        conv("t:9", "Is my refund done?", "Yes, since Monday.", intent="get_refund"),
    ]
    summary = build(conversations, ticket_tokenizer, tmp_path / "ds", val_fraction=0)
    assert summary.card["dropped"] == {
        "duplicate_exact": 1,
        "duplicate_normalised": 1,
        "no_agent_reply": 1,
        "empty_reply": 1,
        "no_customer_turn": 1,
        "pii_after_redaction": 1,
    }
    data = load_from_disk(str(summary.path))
    assert [row["origin"] for row in data["train"]] == ["t:1", "t:7", "t:9"]
    assert data["train"][1]["messages"][-1] == {"role": "agent", "content": "Yes, all major cards."}
    assert data["validation"].num_rows == 0


def test_over_long_examples_keep_the_reply(tmp_path, ticket_tokenizer):
    history = ["I ordered a blue jacket last week. " * 30, "Which order?", "The one from Tuesday. " * 20]
    reply = "I found it: it ships tomorrow."
    summary = build([conv("t:1", *history, reply)], ticket_tokenizer, tmp_path / "ds", max_length=48, val_fraction=0)
    row = load_from_disk(str(summary.path))["train"][0]
    assert len(row["input_ids"]) == 48
    rendered = render_example(row["messages"], ticket_tokenizer)
    reply_ids = ticket_tokenizer(rendered.completion, add_special_tokens=False)["input_ids"]
    assert [label for label in row["labels"] if label != IGNORE_INDEX] == reply_ids
    assert summary.card["truncated"] == 1
    assert summary.card["token_lengths"]["before_truncation"]["max"] > 48


def test_split_is_stratified_and_reproducible(tmp_path, ticket_tokenizer, sample_tickets):
    conversations = list(conversations_from_jsonl(sample_tickets))
    a = build(conversations, ticket_tokenizer, tmp_path / "a", seed=7, val_fraction=0.2)
    b = build(conversations, ticket_tokenizer, tmp_path / "b", seed=7, val_fraction=0.2)
    c = build(conversations, ticket_tokenizer, tmp_path / "c", seed=8, val_fraction=0.2)
    val = {name: load_from_disk(str(s.path))["validation"]["origin"] for name, s in zip("abc", (a, b, c), strict=True)}
    assert val["a"] == val["b"]
    assert a.content_hash == b.content_hash
    assert set(val["a"]) != set(val["c"])
    assert a.content_hash != c.content_hash
    total = a.card["counts"]["total"]["intent"]
    in_val = a.card["counts"]["validation"]["intent"]
    for intent, n in total.items():
        assert in_val.get(intent, 0) == min(round(n * 0.2), n - 1), intent


def test_stratified_split_keeps_rare_strata_in_train():
    strata = [0] * 10 + [1] * 3 + [2]
    train, val = stratified_split(strata, 0.5, seed=1)
    assert sorted(train + val) == list(range(14))
    assert Counter(strata[i] for i in val) == {0: 5, 1: 2}
    assert 13 in train  # the only example of stratum 2
    assert stratified_split(strata, 0.5, seed=1) == (train, val)
    assert stratified_split(strata, 0.0, seed=1) == (list(range(14)), [])


def test_max_examples_stops_early(tmp_path, ticket_tokenizer, sample_tickets):
    summary = build(conversations_from_jsonl(sample_tickets), ticket_tokenizer, tmp_path / "ds", max_examples=25)
    assert summary.num_train + summary.num_validation == 25
    assert summary.card["stopped_at_max_examples"] is True


def test_worker_processes_build_the_same_dataset(tmp_path, ticket_tokenizer, sample_tickets):
    conversations = list(conversations_from_jsonl(sample_tickets))[:150]
    one = build(conversations, ticket_tokenizer, tmp_path / "one", system_prompt=SYSTEM)
    two = build(conversations, ticket_tokenizer, tmp_path / "two", system_prompt=SYSTEM, workers=2)
    assert two.content_hash == one.content_hash
    assert two.card["dropped"] == one.card["dropped"]
    assert two.card["redactions"] == one.card["redactions"]


def test_nothing_to_build_writes_nothing(tmp_path, ticket_tokenizer):
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match="No conversations to build from"):
        build([], ticket_tokenizer, out)
    with pytest.raises(ValueError, match=r"None of the 1 conversations made a usable example \(no_agent_reply: 1\)"):
        build([conv("t:1", "Hello?")], ticket_tokenizer, out)
    assert list(tmp_path.iterdir()) == []  # not even a partial folder


def test_an_existing_output_folder_is_not_overwritten(tmp_path, ticket_tokenizer):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build([conv("t:1", "Hi", "Hello")], ticket_tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_customer_fields_are_redacted_in_every_turn(tmp_path, ticket_tokenizer):
    jane = CustomerFields.from_values(name="Jane Doe", email="jane@example.com", identifiers=["A-55-1234"])
    summary = build(
        [conv("t:1", "I'm Jane, order A-55-1234", "Thanks Jane Doe, I mailed jane@example.com.", customer=jane)],
        ticket_tokenizer,
        tmp_path / "ds",
        val_fraction=0,
    )
    messages = load_from_disk(str(summary.path))["train"][0]["messages"]
    assert messages == [
        {"role": "customer", "content": "I'm {{NAME}}, order {{ACCOUNT_ID}}"},
        {"role": "agent", "content": "Thanks {{NAME}}, I mailed {{EMAIL}}."},
    ]
    assert summary.card["redactions"] == {"NAME": 2, "ACCOUNT_ID": 1, "EMAIL": 1}


def test_retrieval_index_and_intent_classifier_come_from_the_train_split_only(sample_build):
    from finetune.ml.knowledge import load_knowledge

    card = sample_build.card
    train = load_from_disk(str(sample_build.path))["train"]
    validation = load_from_disk(str(sample_build.path))["validation"]
    knowledge = load_knowledge(sample_build.path, strict=True)

    assert card["retrieval"]["exchanges"] == len(knowledge.index) == card["num_train"]
    assert {e.origin for e in knowledge.index.exchanges} == set(train["origin"])
    assert not {e.origin for e in knowledge.index.exchanges} & set(validation["origin"])
    assert card["intent_classifier"]["intents"] == len(set(train["intent"]))
    assert card["intent_classifier"]["validation_accuracy"] > 0.5
    # A validation question finds training exchanges, best first.
    hits = knowledge.index.search(validation[0]["messages"][-2]["content"], k=3)
    assert hits
    assert hits[0].score >= hits[-1].score


def test_one_intent_builds_an_index_but_no_classifier(tmp_path, ticket_tokenizer):
    conversations = [conv(f"t:{i}", f"where is my parcel number {i} please", f"It ships on day {i}.") for i in range(6)]

    summary = build(conversations, ticket_tokenizer, tmp_path / "ds", val_fraction=0.2)

    assert summary.card["retrieval"]["exchanges"] == summary.num_train
    assert "intent_classifier" not in summary.card
    assert not (summary.path / "intent").exists()
