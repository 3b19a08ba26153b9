"""Evaluation of a fine-tuned model: validation loss and perplexity, ROUGE-L of generated replies,
and a retrieval baseline to compare against. Plain Python, no Django.

The loss is the mean cross-entropy per reply token (the prompt is masked, exactly as
in training), so it is the number the promotion gate compares. ROUGE-L on a sample
of generated replies says how close the bot's words are to the agents'; the
retrieval baseline answers each validation question with the training reply of the
most similar training question (TF-IDF cosine), so the team sees whether
fine-tuning beats plain lookup.

    from finetune.ml.evaluation import rouge_l
    rouge_l("your order has shipped", "the order has shipped today")  # 0.667
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from .prompting import IGNORE_INDEX

_WORD = re.compile(r"\w+", re.UNICODE)


# --- ROUGE-L ------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is ignored, as in the reference ROUGE scorer."""
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0] * (len(b) + 1)
        for j, token_b in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (0 when either is empty)."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float | None:
    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    if not candidates:
        return None
    return sum(rouge_l(c, r) for c, r in zip(candidates, references, strict=True)) / len(candidates)


# --- retrieval baseline ----------------------------------------------------------------


class RetrievalBaseline:
    """Answer a question with the training reply of the most similar training question.

    TF-IDF over word unigrams and bigrams with sublinear term frequency; cosine
    similarity (TF-IDF rows are L2-normalised, so a dot product).
    """

    def __init__(self, questions: Sequence[str], replies: Sequence[str]):
        if len(questions) != len(replies):
            raise ValueError("questions and replies differ in length")
        if not questions:
            raise ValueError("the retrieval baseline needs at least one training example")
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._replies = list(replies)
        self._vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        self._matrix = self._vectorizer.fit_transform(questions)

    def predict(self, questions: Sequence[str]) -> list[str]:
        if not questions:
            return []
        similarities = self._vectorizer.transform(questions) @ self._matrix.T
        best = similarities.toarray().argmax(axis=1)
        return [self._replies[int(i)] for i in best]


# --- loss and perplexity -----------------------------------------------------------------


@dataclass(frozen=True)
class LossResult:
    loss: float | None  # mean cross-entropy per reply token; None without validation data
    perplexity: float | None
    tokens: int  # reply tokens scored
    examples: int


def reply_token_loss_sum(model, batch: dict, *, autocast: Callable | None = None):
    """Summed cross-entropy over the reply tokens of a batch, and how many there are.

    Logits are computed only where a label exists (the reply), not for the prompt or
    the padding: with a 50k-word vocabulary the full logits tensor is the largest
    activation of a small model, and most of it would be masked away.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    input_ids = batch["input_ids"]
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        return torch.zeros((), device=input_ids.device, requires_grad=model.training), 0
    context = autocast() if autocast is not None else nullcontext()
    with context:
        backbone, head = _backbone_and_head(model)
        if backbone is not None:
            hidden = backbone(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
            selected = hidden[:, :-1][mask]
            logits = head(selected)
        else:  # an architecture with a transformed head (soft-capping, logit scale): the model's own forward
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    loss_sum = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss_sum, n_tokens


# Configs with these attributes set change the logits after the output projection,
# so hidden @ lm_head alone would be wrong for them.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _backbone_and_head(model):
    """The decoder stack and output projection of a (possibly peft-wrapped) causal LM, or (None, None)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS):
        return None, None
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    head = causal_lm.get_output_embeddings()
    if backbone is None or backbone is causal_lm or head is None:
        return None, None
    return backbone, head


def evaluate_loss(
    model, batches: Iterable[dict], *, device: str = "cpu", autocast: Callable | None = None
) -> LossResult:
    """Mean reply-token cross-entropy and perplexity over ``batches`` (already collated)."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens, examples = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss_sum, n = reply_token_loss_sum(model, batch, autocast=autocast)
                total += float(loss_sum)
                tokens += n
                examples += int(batch["input_ids"].shape[0])
    finally:
        model.train(was_training)
    if tokens == 0:
        return LossResult(loss=None, perplexity=None, tokens=0, examples=examples)
    loss = total / tokens
    return LossResult(loss=loss, perplexity=perplexity(loss), tokens=tokens, examples=examples)


def perplexity(loss: float) -> float:
    # exp overflows past ~709; a perplexity that large only says "untrained".
    return math.exp(min(loss, 700.0))


# --- generation ---------------------------------------------------------------------------


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """The reply up to the first stop sequence (a new turn label or an end marker)."""
    end = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                end = min(end, index)
    return text[:end].strip()


def generate_replies(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    stops: Sequence[str],
    max_new_tokens: int = 96,
    batch_size: int = 8,
    device: str = "cpu",
    autocast: Callable | None = None,
) -> list[str]:
    """Greedy replies to rendered prompts, batched with left padding, cut at the stop strings."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            context = autocast() if autocast is not None else nullcontext()
            with torch.no_grad(), context:
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for row in new_tokens:
                text = tokenizer.decode(row, skip_special_tokens=False)
                replies.append(cut_at_stop(text, stops))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies
