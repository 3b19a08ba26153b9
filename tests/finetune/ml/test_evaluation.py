"""Evaluation (plain Python): ROUGE-L, the retrieval baseline, reply-only loss and perplexity, generated replies."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.ml.evaluation import (
    RetrievalBaseline,
    cut_at_stop,
    evaluate_loss,
    generate_replies,
    mean_rouge_l,
    perplexity,
    reply_token_loss_sum,
    rouge_l,
)
from finetune.ml.prompting import IGNORE_INDEX, PLAIN_STOP_SEQUENCES
from finetune.ml.training import Example, collate


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def two_examples() -> dict:
    """A batch whose second row is padded: 3 + 1 reply tokens are scored, the prompt and padding are not."""
    return collate(
        [
            Example([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], "", "", ""),
            Example([5, 6], [IGNORE_INDEX, 6], "", "", ""),
        ],
        pad_token_id=0,
    )


# --- ROUGE-L ---------------------------------------------------------------------------------


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    # LCS "order has shipped": precision 3/4, recall 3/5.
    assert rouge_l("your order has shipped", "the order has shipped today") == pytest.approx(2 / 3)
    assert rouge_l("Your ORDER has shipped!", "your order, has shipped") == 1.0  # case and punctuation ignored
    assert rouge_l("refund issued", "your parcel is late") == 0.0
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("shipped order", "order shipped") == pytest.approx(0.5)  # order matters


def test_mean_rouge_l_over_pairs():
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    assert mean_rouge_l([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        mean_rouge_l(["a"], [])


# --- retrieval baseline ------------------------------------------------------------------------


def test_retrieval_baseline_answers_with_the_reply_of_the_closest_question():
    baseline = RetrievalBaseline(
        ["Where is my order?", "How do I reset my password?", "I want a refund for my order."],
        ["It ships today.", "Use the reset link.", "Refunds take five days."],
    )
    assert baseline.predict(["where is the order I placed", "password reset please", "refund"]) == [
        "It ships today.",
        "Use the reset link.",
        "Refunds take five days.",
    ]
    assert baseline.predict([]) == []
    with pytest.raises(ValueError, match="at least one training example"):
        RetrievalBaseline([], [])
    with pytest.raises(ValueError, match="differ in length"):
        RetrievalBaseline(["q"], [])


# --- loss and perplexity -----------------------------------------------------------------------


def test_reply_only_loss_equals_the_models_own_masked_loss(tiny_model):
    batch = two_examples()
    with torch.no_grad():
        total, n = reply_token_loss_sum(tiny_model, batch)
        reference = tiny_model(**batch).loss  # transformers' mean over the same unmasked labels
    assert n == 4
    assert float(total) / n == pytest.approx(float(reference), rel=1e-5)


def test_evaluate_loss_is_the_mean_over_reply_tokens_and_leaves_the_mode_alone(tiny_model):
    batch = two_examples()
    with torch.no_grad():
        reference = float(tiny_model(**batch).loss)
    tiny_model.train()
    try:
        result = evaluate_loss(tiny_model, [two_examples(), two_examples()])
        assert tiny_model.training  # put back as it was
    finally:
        tiny_model.eval()
    assert (result.tokens, result.examples) == (8, 4)
    assert result.loss == pytest.approx(reference, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(reference), rel=1e-5)

    prompts_only = collate([Example([5, 6], [IGNORE_INDEX, IGNORE_INDEX], "", "", "")], pad_token_id=0)
    empty = evaluate_loss(tiny_model, [prompts_only])
    assert (empty.loss, empty.perplexity, empty.tokens, empty.examples) == (None, None, 0, 1)


def test_perplexity_is_exp_of_the_loss_and_never_overflows():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert math.isfinite(perplexity(10_000.0))


# --- generation ------------------------------------------------------------------------------


def test_cut_at_stop_keeps_the_reply_before_the_first_stop_string():
    assert cut_at_stop(" It ships today.\nCustomer: thanks", PLAIN_STOP_SEQUENCES) == "It ships today."
    assert cut_at_stop("Done.<|endoftext|>Agent: more", ("<|endoftext|>", "\nAgent:")) == "Done."
    assert cut_at_stop("  no stop here  ", ("", "\nAgent:")) == "no stop here"


def test_generated_replies_are_greedy_batched_and_cut(tiny_model, tiny_tokenizer):
    prompts = ["Customer: Where is my order?\nAgent:", "Customer: I want a refund.\nAgent:", "Customer: Hi\nAgent:"]
    side = tiny_tokenizer.padding_side
    batched = generate_replies(tiny_model, tiny_tokenizer, prompts, stops=PLAIN_STOP_SEQUENCES, max_new_tokens=6)
    one_by_one = [
        generate_replies(tiny_model, tiny_tokenizer, [p], stops=PLAIN_STOP_SEQUENCES, max_new_tokens=6)[0]
        for p in prompts
    ]
    assert batched == one_by_one  # left padding does not change a greedy reply
    assert all(not any(stop in reply for stop in PLAIN_STOP_SEQUENCES) for reply in batched)
    assert tiny_tokenizer.padding_side == side  # restored
    assert not tiny_model.training
