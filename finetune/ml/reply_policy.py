"""Which reply goes out: the model's, a retrieved exchange's answer, or a handoff to a person.

The one decision function used by the evaluation (the quality gate scores exactly what
customers would get) and by serving (the runtime asks it before the reply is sent)::

    choice = choose_reply(model_reply, mean_logprob, hits, ReplyPolicyConfig())
    if choice.source == "handoff": ...            # no usable reply: a person takes over
    send(choice.text)                             # model words or a past answer
    log(choice.source, choice.origin, choice.score, choice.reason)

``hits`` are the retrieval index's neighbours for this conversation, best first
(``RetrievalIndex.search(retrieval_query(messages), k=8)``); ``[]`` when the version
has no index (versions trained before grounding), which leaves today's behaviour:
the model's reply unless it is too unsure (``handoff_logprob``, the consumer's old
rule).

Modes (``ReplyPolicyConfig.mode``), measured on 64 seeded Bitext validation examples
(docs/quality-research.md, E2-E4):

- ``consensus`` (default): the model's reply and the ``consensus_answers`` nearest
  answers of the intent the neighbours vote for are candidates; the one most like the
  others (mean ROUGE-L, minimum Bayes risk) goes out. A reply that wanders off the
  question loses to the answers that agree with each other; one that adapts them well
  wins. E4: 0.362 ROUGE-L / 1.0 intent accuracy against 0.351 / 0.984 for the top
  retrieved answer. With fewer than two answers to compare it falls back to ``fallback``.
- ``fallback``: the model's reply unless its mean token log-probability is below
  ``fallback_logprob`` and the top answer's similarity is at least ``fallback_score``;
  then that answer. E3: -0.5 took 0.50 intent accuracy to 0.97.
- ``model``: always the model's reply (the handoff rule still applies).

Streaming: serving may decide on the first sentence(s) only, before the rest is shown.
``partial=True`` then cuts every retrieved candidate to as many sentences as the model
text has, so like is compared with like (ROUGE-L F1 of one sentence against a whole
answer would always favour the answer).

Text only, no placeholders: filling ``{{…}}`` slots happens after the choice, on
whatever text is chosen (``finetune.serving.placeholders``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

from .evaluation import rouge_l
from .retrieval import Neighbour, intent_vote

SOURCE_MODEL = "model"
SOURCE_RETRIEVED = "retrieved"
SOURCE_HANDOFF = "handoff"
MODES = ("consensus", "fallback", "model")
WEIGHTINGS = ("uniform", "score")


@dataclass(frozen=True)
class ReplyPolicyConfig:
    """Thresholds of the reply choice; each default carries its measurement (docs/quality-research.md)."""

    mode: str = "consensus"
    # Nearest answers of the voted intent that compete with the model's reply (E1b: 3 and 5 within 0.005).
    consensus_answers: int = 3
    # consensus mode: the model's reply goes out only when its agreement with the other candidates
    # (mean ROUGE-L) beats the best past answer's by this much; 0 is plain minimum Bayes risk.
    model_margin: float = 0.0
    # consensus mode: "uniform" (every other candidate counts the same) or "score" (a past answer
    # counts by its retrieval similarity, the model's reply as much as the closest answer).
    weighting: str = "uniform"
    # fallback mode: below this mean log-probability the model's reply is doubtful (E2/E3: -0.5 beat -0.7).
    fallback_logprob: float = -0.5
    # ...and an answer this similar (cosine, 0..1) replaces it; farther answers are no better than the model.
    fallback_score: float = 0.3
    # A neighbour below this similarity shares almost nothing with the question (grounding's min_score).
    min_score: float = 0.05
    # With no usable neighbour, a model reply this unsure is handed to a person
    # (settings.SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD's default, the consumer's existing rule).
    handoff_logprob: float = -2.5
    # Neighbours voting on the intent whose answers may be used (grounding's vote_top).
    vote_top: int = 5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unknown reply policy mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.consensus_answers < 1:
            raise ValueError("consensus_answers must be at least 1.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown consensus weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}.")
        if not 0.0 <= self.model_margin <= 1.0:
            raise ValueError("model_margin is a ROUGE-L difference: between 0 and 1 (1: never the model's reply).")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ReplyPolicyConfig:
        """From ``to_json`` output; unknown keys (a newer version's) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass(frozen=True)
class ReplyChoice:
    """The reply to send and why. ``text`` is "" for a handoff."""

    source: str  # SOURCE_MODEL / SOURCE_RETRIEVED / SOURCE_HANDOFF
    text: str
    reason: str
    origin: str = ""  # the retrieved exchange's origin (ticket:<source>:<id>, correction:<id>)
    intent: str = ""  # the retrieved exchange's intent, or the neighbours' vote for a model reply
    score: float | None = None  # the retrieved exchange's similarity to the question

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def usable_answers(hits: Sequence[Neighbour], config: ReplyPolicyConfig | None = None) -> tuple[list[Neighbour], str]:
    """The neighbours whose answers may go out (closest first), and the intent they share."""
    config = config or ReplyPolicyConfig()
    intent, _ = intent_vote(hits, top=config.vote_top)
    close = [h for h in hits if h.score >= config.min_score and h.exchange.reply.strip()]
    if intent:
        close = [h for h in close if h.exchange.intent == intent]
    return close[: config.consensus_answers], intent


@lru_cache(maxsize=16384)
def _similarity(a: str, b: str) -> float:
    # ROUGE-L F1 is symmetric: one entry per pair. Popular answers meet again and again.
    return rouge_l(a, b) if a <= b else rouge_l(b, a)


def agreement(candidates: Sequence[str], weights: Sequence[float] | None = None) -> list[float]:
    """Each candidate's mean ROUGE-L with the others, weighted by ``weights`` (default: equal).

    The candidate that agrees most is the minimum-Bayes-risk choice: the one closest, on
    average, to what the others say a good reply is.
    """
    weights = list(weights) if weights is not None else [1.0] * len(candidates)
    if len(weights) != len(candidates):
        raise ValueError("agreement needs one weight per candidate")
    out = []
    for i, candidate in enumerate(candidates):
        total = sum(weights[j] for j in range(len(candidates)) if j != i)
        score = sum(weights[j] * _similarity(candidate, other) for j, other in enumerate(candidates) if j != i)
        out.append(score / total if total > 0 else 0.0)
    return out


def consensus(candidates: Sequence[str], weights: Sequence[float] | None = None) -> int:
    """Index of the candidate most like the others (``agreement``); ties go to the earlier one.

    Fewer than three candidates cannot outvote each other: 0.
    """
    if len(candidates) < 3:
        return 0
    scores = agreement(candidates, weights)
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


def consensus_weights(answers: Sequence[Neighbour], config: ReplyPolicyConfig, *, model: bool) -> list[float] | None:
    """The weights of ``agreement`` for [model reply,] answers under ``config.weighting`` (None: equal)."""
    if config.weighting == "uniform":
        return None
    scores = [max(a.score, 0.0) for a in answers]
    return [max(scores, default=0.0), *scores] if model else scores


_SENTENCE_RE = re.compile(r".*?(?:[.!?](?=\s|$)|\n|$)", re.S)


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (ended by . ! ? before a space, or a line break), stripped, non-empty."""
    return [s.strip() for s in _SENTENCE_RE.findall(text or "") if s.strip()]


def first_sentences(text: str, n: int) -> str:
    return " ".join(sentences(text)[: max(1, n)])


def choose_reply(
    model_reply: str,
    mean_logprob: float | None,
    hits: Sequence[Neighbour],
    config: ReplyPolicyConfig | None = None,
    *,
    partial: bool = False,
) -> ReplyChoice:
    """The reply to send for ``model_reply`` (already cut at a repetition), given the neighbours ``hits``.

    ``mean_logprob`` is the mean log-probability of the model's tokens (None: unknown,
    taken as confident). ``partial``: ``model_reply`` is only the first sentence(s) of a
    reply still being generated (see the module docstring).
    """
    config = config or ReplyPolicyConfig()
    text = (model_reply or "").strip()
    answers, intent = usable_answers(hits, config)
    unsure = mean_logprob is not None and (math.isnan(mean_logprob) or mean_logprob < config.fallback_logprob)

    def retrieved(hit: Neighbour, reason: str) -> ReplyChoice:
        return ReplyChoice(
            SOURCE_RETRIEVED,
            hit.exchange.reply.strip(),
            reason,
            origin=hit.exchange.origin,
            intent=hit.exchange.intent,
            score=round(hit.score, 4),
        )

    def model(reason: str) -> ReplyChoice:
        return ReplyChoice(SOURCE_MODEL, text, reason, intent=intent)

    if not answers:
        if not text:
            return ReplyChoice(SOURCE_HANDOFF, "", "The model gave no reply and no past exchange is close.")
        if mean_logprob is not None and (math.isnan(mean_logprob) or mean_logprob < config.handoff_logprob):
            return ReplyChoice(
                SOURCE_HANDOFF,
                "",
                f"The model is unsure (mean log-probability {_fmt(mean_logprob)} < {config.handoff_logprob}) "
                "and no past exchange is close.",
            )
        return model("No past exchange is close; the model's reply is sure enough.")
    if not text:
        return retrieved(answers[0], "The model gave no reply; the closest past answer is sent.")
    if config.mode == "model":
        return model("Policy: the model's reply.")
    if config.mode == "consensus" and len(answers) >= 2:
        sentence_count = len(sentences(text))
        pool = [a.exchange.reply.strip() for a in answers]
        if partial:
            pool = [first_sentences(a, sentence_count) for a in pool]
        scores = agreement([text, *pool], consensus_weights(answers, config, model=True))
        best = max(range(1, len(scores)), key=lambda i: (scores[i], -i))
        if scores[0] >= scores[best] + config.model_margin:
            return model(
                f"The model's reply agrees most with the {len(answers)} nearest answers "
                f"({scores[0]:.2f} >= {scores[best]:.2f} + margin {config.model_margin})."
            )
        return retrieved(
            answers[best - 1],
            f"Past answer {best} of the {len(answers)} nearest agrees most with the others and the model's reply "
            f"({scores[best]:.2f}; the model's {scores[0]:.2f}, margin {config.model_margin}).",
        )
    top = answers[0]
    if unsure and top.score >= config.fallback_score:
        return retrieved(
            top,
            f"The model is unsure (mean log-probability {_fmt(mean_logprob)} < {config.fallback_logprob}) and a past "
            f"answer is close (similarity {top.score:.2f} >= {config.fallback_score}).",
        )
    return model("The model is sure enough, or no past answer is close enough to replace it.")


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"
