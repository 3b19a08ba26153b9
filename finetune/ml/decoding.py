"""Repetition controls for generation, identical in evaluation and in both serving engines.

transformers' ``NoRepeatNGramLogitsProcessor`` and ``RepetitionPenaltyLogitsProcessor``
look at every token of ``input_ids``, and for a decoder-only model that includes the
prompt. With grounding the prompt holds the answers the model should adapt, so a
processor that sees them forbids exactly the words it is meant to reuse: measured on
the Bitext split, no-repeat 4-grams over the whole sequence dropped ROUGE-L by a
third (docs/quality-research.md). ``GeneratedOnly`` hands a processor the generated
tokens only.

    processors = repetition_processors(prompt_width=encoded.input_ids.shape[1])
    model.generate(**encoded, logits_processor=processors, ...)

Batches are left-padded, so every row's generated tokens start at the same column.
``BatchedEngine`` keeps one token list per row; it calls ``apply_to_row``.

``NoRepeatNGram`` is the same n-gram ban for one sequence, kept up to date token by
token: what a vLLM server applies per request (``finetune.serving.vllm_logits``), since
vLLM has no ``no_repeat_ngram_size`` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodingConfig:
    """Each default carries its reason (docs/quality-research.md)."""

    # A 6-token sequence repeated inside one reply is a loop in a support answer;
    # shorter n-grams ("{{Order Number}}", "in the app") recur legitimately. With it, 1 of
    # 128 generated replies still repeated itself and was cut (docs/quality-research.md).
    no_repeat_ngram_size: int = 6
    # Off: a penalty on every token already used also pushes the model off the words of
    # the reply it is adapting (not measured here; a candidate for phase B's sweep).
    repetition_penalty: float = 1.0


class NoRepeatNGram:
    """The ``no_repeat_ngram_size`` ban for one sequence's generated tokens, updated incrementally.

    ``model(generated, logits_row)`` sets to -inf every token that would complete an
    ``n``-token run already among ``generated`` (the sequence's generated tokens only, as
    ``GeneratedOnly`` gives transformers' processor): the same tokens
    ``NoRepeatNGramLogitsProcessor`` bans. Each call indexes only the runs ended by the
    tokens added since the last one, so a reply costs O(length); a list that got shorter
    (a preempted request restarted) is indexed again from the start.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be 1 or more, not {n}.")
        self.n = n
        self._next: dict[tuple[int, ...], set[int]] = {}  # n-1 tokens -> the tokens that followed them
        self._indexed = 0  # runs ending before this many tokens are in _next

    def banned(self, generated) -> set[int]:
        """The tokens that may not come next after ``generated``."""
        n, length = self.n, len(generated)
        if length < self._indexed:
            self._next, self._indexed = {}, 0
        for end in range(max(self._indexed, n), length + 1):
            self._next.setdefault(tuple(generated[end - n : end - 1]), set()).add(generated[end - 1])
        self._indexed = max(self._indexed, length)
        if length + 1 < n:
            return set()
        return self._next.get(tuple(generated[length - n + 1 :]), set())

    def __call__(self, generated, logits_row):
        banned = self.banned(generated)
        if banned:
            logits_row[list(banned)] = float("-inf")
        return logits_row


class GeneratedOnly:
    """A logits processor applied to the tokens generated after column ``prompt_width``."""

    def __init__(self, processor, prompt_width: int):
        self.processor = processor
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        return self.processor(generated, scores)


def repetition_processors(prompt_width: int, config: DecodingConfig | None = None):
    """A ``LogitsProcessorList`` with the configured controls, blind to the prompt."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    config = config or DecodingConfig()
    processors = LogitsProcessorList()
    if config.no_repeat_ngram_size > 0:
        processors.append(GeneratedOnly(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size), prompt_width))
    if config.repetition_penalty != 1.0:
        processors.append(GeneratedOnly(RepetitionPenaltyLogitsProcessor(config.repetition_penalty), prompt_width))
    return processors


def apply_to_row(processors, generated: list[int], scores_row):
    """Run ``processors`` (from ``repetition_processors(0)``) on one row's generated tokens.

    ``scores_row`` is that row's logits, shape (vocab,) or (1, vocab); returns the same shape.
    """
    import torch

    if not processors or not generated:
        return scores_row
    flat = scores_row.dim() == 1
    scores = scores_row.unsqueeze(0) if flat else scores_row
    ids = torch.tensor([generated], dtype=torch.long, device=scores.device)
    out = processors(ids, scores)
    return out[0] if flat else out
