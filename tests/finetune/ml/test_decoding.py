"""Repetition controls see the generated tokens only, never the grounded prompt."""

from __future__ import annotations

import torch

from finetune.ml.decoding import DecodingConfig, apply_to_row, repetition_processors


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
