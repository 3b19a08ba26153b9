"""The quality evaluation: batched scored generation, retrieval rows, the served path's choice and filling, caching."""

from __future__ import annotations

import pytest

from finetune.ml.intent import IntentClassifier
from finetune.ml.quality import (
    GenerationCache,
    cached_rows,
    generate_for,
    generate_scored,
    quality_examples,
    retrieval_rows,
    sample_indices,
    served_row,
)
from finetune.ml.reply_policy import ReplyPolicyConfig
from finetune.ml.retrieval import Exchange, RetrievalIndex

TRACK = [
    ("where is my package", "Your package is with the courier. Track it under Orders with order {{Order Number}}."),
    ("my parcel has not arrived", "Your package is with the courier. Track it under Orders in your account."),
    ("where is my order right now", "Your order is with the courier. The tracking link is in your e-mail."),
]
REFUND = [
    ("i want my money back", "Refunds reach your card within five days of the return arriving."),
    ("refund please", "I have started your refund; it reaches your card within five days."),
    ("how do refunds work", "Send the item back; the refund reaches your card within five days."),
]


NO_MARGIN = ReplyPolicyConfig(model_margin=0.0)  # the model's reply wins when it agrees as well as the best answer


@pytest.fixture(scope="module")
def index():
    rows = [Exchange(q, a, "track_order", f"ticket:t:{i}") for i, (q, a) in enumerate(TRACK)]
    rows += [Exchange(q, a, "get_refund", f"ticket:r:{i}") for i, (q, a) in enumerate(REFUND)]
    return RetrievalIndex.build(rows)


@pytest.fixture(scope="module")
def classifier():
    replies = [a for _, a in TRACK + REFUND]
    return IntentClassifier.train(replies, ["track_order"] * 3 + ["get_refund"] * 3)


def conversations():
    return [
        [
            {"role": "customer", "content": "where is my package, order 48213?"},
            {"role": "agent", "content": TRACK[0][1]},
        ],
        [{"role": "customer", "content": "i want a refund"}, {"role": "agent", "content": REFUND[1][1]}],
    ]


def test_examples_are_grounded_and_the_reference_filled_with_the_customers_values(index, ticket_tokenizer):
    examples = quality_examples(conversations(), ["track_order", "get_refund"], index, ticket_tokenizer)

    assert [e.grounded for e in examples] == [True, True]
    assert "48213" in examples[0].reference  # {{Order Number}} filled with what the customer wrote
    assert "{{" not in examples[0].reference
    assert examples[0].prompt.used
    assert examples[0].hits[0].exchange.intent == "track_order"
    ungrounded = quality_examples(conversations(), ["", ""], index, ticket_tokenizer, grounded=False)
    assert not ungrounded[0].prompt.used
    assert ungrounded[0].hits  # the retrieval baseline still has its neighbours


def test_a_french_conversation_is_scored_with_french_neutral_words(index, ticket_tokenizer):
    # As served: the filler writes the conversation's language (the reference, and every reply scored).
    french = [
        {"role": "customer", "content": "Bonjour, où est ma commande ? Elle n'est toujours pas arrivée."},
        {"role": "agent", "content": "La commande {{Order Number}} est en route ; suivez-la sur {{Website URL}}."},
    ]

    example = quality_examples([french], ["track_order"], index, ticket_tokenizer)[0]

    assert example.language == "fr"
    assert example.reference == "Votre commande est en route ; suivez-la sur notre site web."


def test_a_development_example_from_the_training_split_never_sees_its_own_exchange(index, ticket_tokenizer):
    # The index's own row 1: "my parcel has not arrived" and its reply.
    own = [{"role": "customer", "content": TRACK[1][0]}, {"role": "agent", "content": TRACK[1][1]}]

    seen = quality_examples([own], ["track_order"], index, ticket_tokenizer)[0]
    kept_out = quality_examples([own], ["track_order"], index, ticket_tokenizer, exclude=[1])[0]
    ungrounded = quality_examples([own], ["track_order"], index, ticket_tokenizer, grounded=False, exclude=[1])[0]

    assert seen.hits[0].position == 1  # without exclude the answer is in the index: a perfect "retrieval"
    assert 1 not in [h.position for h in kept_out.hits]
    assert all(n.position != 1 for n in kept_out.prompt.used)
    assert 1 not in [h.position for h in ungrounded.hits]
    with pytest.raises(ValueError, match="one index row"):
        quality_examples([own], ["track_order"], index, ticket_tokenizer, exclude=[])


def test_retrieval_rows_answer_with_the_nearest_and_the_consensus(index, classifier, ticket_tokenizer):
    examples = quality_examples(conversations(), ["track_order", "get_refund"], index, ticket_tokenizer)

    top, agreed = retrieval_rows(examples, classifier)

    assert top.name == "retrieval"
    assert agreed.name == "retrieval-consensus"
    assert top.intent_accuracy == 1.0
    assert top.slot_leaks == 0
    assert top.examples[0]["source"] == "retrieved"
    assert top.examples[0]["origin"] == examples[0].hits[0].exchange.origin
    assert 0 < top.rouge_l <= 1


def test_the_served_row_applies_the_policy_and_fills_slots(index, classifier, ticket_tokenizer):
    examples = quality_examples(conversations(), ["track_order", "get_refund"], index, ticket_tokenizer)
    generated = [
        {
            "text": "Your package is with the courier. "
            "Track it under Orders with order {{Order Number}} in your account.",
            "mean_logprob": -0.3,
        },
        {"text": "You can get a refund for damaged items by visiting the manufacturer.", "mean_logprob": -2.0},
    ]
    for g in generated:
        g["tokens"] = 10

    consensus = served_row("candidate", "Candidate", examples, generated, classifier, policy=NO_MARGIN)
    own = served_row("own", "Own words", examples, generated, classifier, policy=ReplyPolicyConfig(mode="model"))

    assert consensus.examples[0]["source"] == "model"
    assert "48213" in consensus.examples[0]["reply"]
    assert consensus.slot_leaks == 0
    assert consensus.examples[1]["source"] == "retrieved"  # the wandering refund reply lost to past answers
    assert consensus.examples[1]["origin"].startswith("ticket:r:")
    assert (consensus.model_replies, consensus.retrieved, consensus.handoffs) == (1, 1, 0)
    assert own.model_replies == 2
    assert own.rouge_l < consensus.rouge_l


def test_the_served_row_decides_where_serving_does_on_the_first_sentence(index, classifier, ticket_tokenizer):
    examples = quality_examples(conversations(), ["track_order", "get_refund"], index, ticket_tokenizer)[:1]
    prime = "Your package is with the courier."
    policy = NO_MARGIN
    on_track = prime + " Track it under Orders in your account. Then the model talks about the weather for a while."
    wanders = (
        prime + " Refunds for damaged items are issued by the manufacturer. Track it under Orders in your account."
    )

    kept = served_row(
        "c",
        "C",
        examples,
        [{"text": on_track, "mean_logprob": -0.2, "tokens": 9, "prime": prime}],
        classifier,
        policy=policy,
    )
    replaced = served_row(
        "c",
        "C",
        examples,
        [{"text": wanders, "mean_logprob": -0.2, "tokens": 9, "prime": prime}],
        classifier,
        policy=policy,
    )

    assert kept.examples[0]["source"] == "model"
    assert "weather" in kept.examples[0]["reply"]  # kept at the first sentence, the whole reply goes out
    assert replaced.examples[0]["source"] == "retrieved"  # its first sentence wandered: replaced before it showed


def test_generation_is_batched_scored_and_reports_progress(tiny_base, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    prompts = [
        "Customer: Where is my order?\nAgent:",
        "Customer: I want a refund please, now.\nAgent:",
        "Customer: Hi\nAgent:",
    ]
    calls = []

    batched = generate_scored(
        model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=lambda d, t: calls.append((d, t))
    )
    alone = [generate_scored(model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]

    assert calls == [(0, 3), (2, 3), (3, 3)]
    assert [b["text"] for b in batched] == [a["text"] for a in alone]  # left padding changes nothing
    for result in batched:
        assert 1 <= result["tokens"] <= 6
        assert result["mean_logprob"] <= 0.0
    assert batched[0]["mean_logprob"] == pytest.approx(alone[0]["mean_logprob"], abs=1e-3)


def test_rows_are_cached_by_key(tmp_path):
    computed = []

    def compute():
        computed.append(1)
        return []

    assert cached_rows(tmp_path, "k1", compute) == []
    assert cached_rows(tmp_path, "k1", compute) == []
    assert len(computed) == 1
    assert (tmp_path / "quality-k1.json").exists()


def test_the_sample_is_seeded_and_sorted():
    assert sample_indices(10, None) == list(range(10))
    assert sample_indices(10, 4, seed=1) == sample_indices(10, 4, seed=1)
    assert sample_indices(10, 4) == sorted(sample_indices(10, 4))
    assert len(sample_indices(10, 4)) == 4


def test_the_prime_and_its_continuation_stay_apart():
    from finetune.ml.quality import join_prime

    assert join_prime("I can help you cancel order 123.", "I'm here to help.") == (
        "I can help you cancel order 123. I'm here to help."
    )
    assert join_prime("Steps:\n", "1. Sign in.") == "Steps:\n1. Sign in."
    assert join_prime("Sure.", "") == "Sure."
    assert join_prime("Sure", ", here it is.") == "Sure, here it is."


def test_generation_cache_reuses_replies_by_prompt(tiny_base, tiny_tokenizer, index, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    examples = quality_examples(conversations(), ["track_order", "get_refund"], index, tiny_tokenizer)
    calls = []

    first, _ = generate_for(
        model,
        tiny_tokenizer,
        examples,
        max_new_tokens=5,
        cache=GenerationCache(tmp_path, "m1"),
        progress=lambda d, t: calls.append(t),
    )
    again, _ = generate_for(
        model,
        tiny_tokenizer,
        examples[1:],
        max_new_tokens=5,
        cache=GenerationCache(tmp_path, "m1"),  # read back from its file
        progress=lambda d, t: calls.append(t),
    )
    other, _ = generate_for(
        model, tiny_tokenizer, examples[:1], max_new_tokens=5, cache=GenerationCache(tmp_path, "m2")
    )

    assert calls[0] == 2
    assert calls[-1] == 0  # nothing left to generate
    assert [g["cached"] for g in first] == [False, False]
    assert [g["cached"] for g in again] == [True]
    assert (again[0]["text"], again[0]["mean_logprob"]) == (first[1]["text"], first[1]["mean_logprob"])
    assert other[0]["cached"] is False  # another identity (weights, decoding) is another file
    assert len(GenerationCache(tmp_path, "m1")) == 2
