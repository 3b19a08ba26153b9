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

Modes (``ReplyPolicyConfig.mode``):

- ``consensus`` (default): among the ``consensus_answers`` nearest answers of the intent
  the neighbours vote for, the one the others agree with most (mean ROUGE-L: the
  minimum-Bayes-risk choice) is the best past answer. The model's reply goes out only
  when its mean agreement with the other answers beats that answer's by
  ``model_margin``; otherwise the best past answer does. A reply that wanders off the
  question loses to answers that agree with each other. With fewer than two answers to
  compare it falls back to ``fallback``.
- ``fallback``: the model's reply unless its mean token log-probability is below
  ``fallback_logprob`` and the top answer's similarity is at least ``fallback_score``;
  then that answer. E3: -0.5 took 0.50 intent accuracy to 0.97.
- ``model``: always the model's reply (the handoff rule still applies).

What the consensus defaults rest on (docs/benchmarks.md, "Reply quality"): tuned on a
development sample of 256 *training* exchanges (each one's own exchange left out of its
neighbours, as in grounded training; the quick adapter's 40 training rows left out),
with the quick adapter's replies decided where serving decides them (below). The
nearest past answer scored 0.365 ROUGE-L there; the old defaults (3 answers, the
model's reply voting, no margin) sent the model's words 212 times in 256 and scored
0.352, *below* it; 8 answers judged by each other, the model not voting, margin 0.3:
0.396, with the model's words sent twice (margin 1.0, never: 0.395). Plainly: the
consensus of past answers is what beats the nearest answer; a 10-step adapter's reply
rarely beats it, and the margin keeps it out unless it clearly does.

Streaming: serving decides on the reply up to the first sentence the model wrote after
the prime (``first_model_sentence``), before any of it is shown; ``partial=True`` then
compares that text with every answer cut to as many sentences (ROUGE-L F1 of one
sentence against a whole answer would always favour the answer). The evaluation
decides at the same point (``quality.served_row``).

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


@dataclass(frozen=True)
class ReplyPolicyConfig:
    """Thresholds of the reply choice; each default carries its measurement (docs/quality-research.md)."""

    mode: str = "consensus"
    # Nearest answers of the voted intent in the consensus: all of the 8 neighbours searched that share
    # the intent. Development sample (256 training exchanges), past answers alone: 3 -> 0.381 ROUGE-L,
    # 4 -> 0.385, 5 -> 0.391, 6 -> 0.394, 8 -> 0.395 (the nearest answer: 0.365).
    consensus_answers: int = 8
    # consensus mode: the model's reply goes out only when its agreement with the other answers (mean
    # ROUGE-L) beats the best past answer's by this much (1.0: never). Development sample, 8 answers:
    # 0 -> 0.365 (197 of 256 replies the model's), 0.1 -> 0.383 (62), 0.2 -> 0.395 (12),
    # 0.3 -> 0.396 (2), 0.4 -> 0.396 (1), 1.0 -> 0.395 (0).
    model_margin: float = 0.3
    # consensus mode: whether the model's reply is also evidence when the past answers' agreement is
    # measured (True: plain minimum Bayes risk among all candidates, the old rule). False: the answers
    # are judged by each other only. The model's reply is primed with and grounded on the nearest
    # answers, so as a voter it pulls the choice towards the nearest answer, the retrieval baseline.
    # Development sample, 5 answers, margin 1.0: voting 0.372, not voting 0.391.
    model_votes: bool = False
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
        if not -1.0 <= self.model_margin <= 1.0:
            raise ValueError("model_margin is a ROUGE-L difference: between -1 and 1 (1: never the model's reply).")

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


def agreement(candidates: Sequence[str]) -> list[float]:
    """Each candidate's mean ROUGE-L with the others.

    The candidate that agrees most is the minimum-Bayes-risk choice: the one closest, on
    average, to what the others say a good reply is.
    """
    n = len(candidates)
    if n < 2:
        return [0.0] * n
    return [
        sum(_similarity(c, o) for j, o in enumerate(candidates) if j != i) / (n - 1) for i, c in enumerate(candidates)
    ]


def consensus(candidates: Sequence[str]) -> int:
    """Index of the candidate most like the others (``agreement``); ties go to the earlier one.

    Fewer than three candidates cannot outvote each other: 0.
    """
    if len(candidates) < 3:
        return 0
    scores = agreement(candidates)
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


_SENTENCE_RE = re.compile(r".*?(?:[.!?](?=\s|$)|\n|$)", re.S)


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (ended by . ! ? before a space, or a line break), stripped, non-empty."""
    return [s.strip() for s in _SENTENCE_RE.findall(text or "") if s.strip()]


def first_sentences(text: str, n: int) -> str:
    return " ".join(sentences(text)[: max(1, n)])


def has_words(text: str) -> bool:
    """Whether ``text`` holds a word in any script: emoji, symbols and digits alone are no reply."""
    return any(ch.isalpha() for ch in text or "")


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
    wordless = bool(text) and not has_words(text)
    if wordless:
        # Emoji, symbols or digits only (the model echoing a flood of emoji): no answer to
        # anyone, so it is treated as no reply at all (and never shown: ``ReplyPipeline``).
        text = ""
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
            what = "The model's reply has no words" if wordless else "The model gave no reply"
            return ReplyChoice(SOURCE_HANDOFF, "", f"{what} and no past exchange is close.")
        if mean_logprob is not None and (math.isnan(mean_logprob) or mean_logprob < config.handoff_logprob):
            return ReplyChoice(
                SOURCE_HANDOFF,
                "",
                f"The model is unsure (mean log-probability {_fmt(mean_logprob)} < {config.handoff_logprob}) "
                "and no past exchange is close.",
            )
        return model("No past exchange is close; the model's reply is sure enough.")
    if not text:
        what = "The model's reply has no words" if wordless else "The model gave no reply"
        return retrieved(answers[0], f"{what}; the closest past answer is sent.")
    if config.mode == "model":
        return model("Policy: the model's reply.")
    if config.mode == "consensus" and len(answers) >= 2:
        best, best_score, model_score = _consensus(
            text, [a.exchange.reply.strip() for a in answers], config, partial=partial
        )
        if model_score >= best_score + config.model_margin:
            return model(
                f"The model's reply agrees with the {len(answers)} nearest answers at least as well as the best of "
                f"them ({model_score:.2f} >= {best_score:.2f} + margin {config.model_margin})."
            )
        return retrieved(
            answers[best],
            f"Past answer {best + 1} of the {len(answers)} nearest agrees most with the others "
            f"({best_score:.2f}; the model's reply {model_score:.2f}, margin {config.model_margin}).",
        )
    top = answers[0]
    if unsure and top.score >= config.fallback_score:
        return retrieved(
            top,
            f"The model is unsure (mean log-probability {_fmt(mean_logprob)} < {config.fallback_logprob}) and a past "
            f"answer is close (similarity {top.score:.2f} >= {config.fallback_score}).",
        )
    return model("The model is sure enough, or no past answer is close enough to replace it.")


def _consensus(
    text: str, answers: Sequence[str], config: ReplyPolicyConfig, *, partial: bool
) -> tuple[int, float, float]:
    """(the best past answer's index, its agreement, the model reply's agreement) in consensus mode.

    ``partial``: ``text`` is the reply's first sentence(s); every answer is compared cut to as
    many sentences. With ``model_votes`` (plain minimum Bayes risk) all candidates are judged
    together on those cuts. Without it the best answer is the one the whole answers agree on
    most (what the retrieval-consensus row sends), and then it and the model's reply are
    scored alike against the other answers (cut as the reply is), so the margin compares like
    with like.
    """
    count = len(sentences(text))
    cut = [first_sentences(a, count) for a in answers] if partial else list(answers)
    if config.model_votes:
        scores = agreement([text, *cut])
        best = max(range(len(answers)), key=lambda i: (scores[i + 1], -i))
        return best, scores[best + 1], scores[0]
    whole = agreement(list(answers))
    best = max(range(len(answers)), key=lambda i: (whole[i], -i))
    others = [a for i, a in enumerate(cut) if i != best]
    best_score = sum(_similarity(cut[best], o) for o in others) / len(others)
    model_score = sum(_similarity(text, o) for o in others) / len(others)
    return best, best_score, model_score


_SENTENCE_DONE_RE = re.compile(r"[.!?。！？](?=\s)|\n")


def first_model_sentence(text: str, prime: str = "") -> str | None:
    """``text`` up to the end of the first sentence the model wrote after ``prime``; None until one is complete.

    Where a streamed reply is decided (``finetune.serving.safety.ReplyPipeline``): as soon as
    this is not None, ``choose_reply(first, ..., partial=True)`` runs, and a retrieved answer
    replaces the reply before any of the model's words are shown. A sentence is complete when
    more text (or a line break) follows its end; the evaluation calls this on whole replies,
    so it decides where serving would.
    """
    text = text or ""
    start = len(prime) if prime and text.startswith(prime) else 0
    match = _SENTENCE_DONE_RE.search(text, start + (len(text[start:]) - len(text[start:].lstrip())))
    return text[: match.end()].strip() if match else None


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"
