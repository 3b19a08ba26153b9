"""Repetition controls see the generated tokens only, never the grounded prompt."""

from __future__ import annotations

import random

import pytest
import torch

from finetune.ml.decoding import DecodingConfig, NoRepeatNGram, apply_to_row, repetition_processors


def test_no_repeat_ngram_bans_a_generated_repeat_but_not_copying_the_prompt():
    vocab = 10
    prompt = [1, 2, 3, 4, 5, 6]  # holds the n-gram (1, 2, 3) -> 4 ... from the grounding
    processors = repetition_processors(len(prompt), DecodingConfig(no_repeat_ngram_size=3))

    # Generating "1 2" after the prompt: copying "3" from the prompt stays allowed.
    ids = torch.tensor([prompt + [1, 2]])
    scores = processors(ids, torch.zeros((1, vocab)))
    assert torch.isfinite(scores[0, 3])

    # The generated text itself already said "1 2 3": saying it again is banned.
    ids = torch.tensor([prompt + [1, 2, 3, 9, 1, 2]])
    scores = processors(ids, torch.zeros((1, vocab)))
    assert scores[0, 3] == float("-inf")
    assert torch.isfinite(scores[0, 7])


def test_one_row_of_a_batch_gets_the_same_treatment():
    processors = repetition_processors(0, DecodingConfig(no_repeat_ngram_size=2))

    row = apply_to_row(processors, [5, 6, 7, 5], torch.zeros(10))

    assert row.shape == (10,)
    assert row[6] == float("-inf")
    assert torch.isfinite(row[7])


def test_repetition_penalty_is_off_by_default_and_blind_to_the_prompt():
    assert len(repetition_processors(3)) == 1  # no-repeat n-grams only
    processors = repetition_processors(3, DecodingConfig(no_repeat_ngram_size=0, repetition_penalty=2.0))
    scores = processors(torch.tensor([[1, 2, 3, 4]]), torch.ones((1, 6)))

    assert scores[0, 1] == 1.0  # prompt token: untouched
    assert scores[0, 4] == 0.5  # generated token: penalised


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_the_per_sequence_ban_vllm_applies_bans_what_transformers_bans(n):
    """NoRepeatNGram (the vLLM plugin's ban), fed one token at a time, against transformers'
    NoRepeatNGramLogitsProcessor on the whole sequence, at every step of random replies."""
    from transformers import NoRepeatNGramLogitsProcessor

    rng = random.Random(n)
    vocab = 6  # few tokens, so runs repeat often
    reference = NoRepeatNGramLogitsProcessor(n)
    for _ in range(20):
        ban = NoRepeatNGram(n)
        generated: list[int] = []
        for _ in range(40):
            ours = ban(generated, torch.zeros(vocab))
            theirs = reference(torch.tensor([generated or [0]])[:, : len(generated)], torch.zeros((1, vocab)))[0]
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (generated, ours, theirs)
            allowed = [token for token in range(vocab) if torch.isfinite(ours[token])]
            generated.append(rng.choice(allowed or range(vocab)))


def test_the_per_sequence_ban_starts_over_when_the_sequence_does():
    ban = NoRepeatNGram(2)
    assert ban.banned([4, 5, 4]) == {5}
    assert ban.banned([4]) == set()  # a preempted request restarts with fewer tokens
    assert ban.banned([4, 6, 4]) == {6}
    with pytest.raises(ValueError, match="1 or more"):
        NoRepeatNGram(0)
