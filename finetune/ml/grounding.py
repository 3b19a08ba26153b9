"""The grounded prompt: the conversation plus the nearest past exchanges, within a token budget.

One function, ``ground``, builds it for training, evaluation and serving alike, so the
adapter is trained on exactly the prompts it is later asked to continue:

- training: ``ground(turns_before_reply, index.search(query, k, exclude=own_row), ...)``,
  then ``finetune.ml.prompting.render_example`` on the grounded turns plus the reply;
- evaluation and serving: ``ground_conversation(conversation, index, ...)`` (search, then
  ``ground``), whose ``GroundedPrompt.text`` is ``finetune.ml.prompting.render_prompt``
  of the grounded turns.

The past exchanges go into the system turn, after the bot profile's prompt, as a
block of question/answer pairs, the closest last (small models copy most from what
is nearest to the question). They are labelled "Similar question"/"Answer" rather
than with the turn labels, so a plain (GPT-2) template does not read them as turns
of this conversation.

Neighbours whose intent differs from the intent most of them share are left out
(``GroundingConfig.same_intent``): a refund answer beside two delivery answers is
what made the demo adapter answer "where is my parcel" with refund instructions.

Budget: the prompt must leave room for the reply. Neighbours are dropped from the
farthest until the rendered prompt fits ``max_prompt_tokens``; each neighbour's
answer is first cut to ``answer_tokens``. A conversation too long for even one
neighbour keeps its newest turns (the oldest are dropped, as the engine does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from finetune.ml.prompting import ROLE_AGENT, ROLE_SYSTEM, normalise_messages, render_prompt

from .retrieval import Neighbour, intent_vote, retrieval_query

SEARCH_K = 8  # neighbours fetched per conversation; grounding and the reply policy keep the voted intent's

BLOCK_HEADER = "Answers our support team gave to similar questions. Adapt the closest one to this customer:"


@dataclass(frozen=True)
class GroundingConfig:
    """How many past exchanges to show and how. Each default carries its reason."""

    # Two answers to adapt (or to agree on) within a 768-token prompt budget; 1 and 3 were not
    # compared yet (docs/quality-research.md lists what was measured).
    neighbours: int = 2
    answer_tokens: int = 200  # Bitext answers: p90 ~200 tokens; longer ones lose their tail, not their steps
    min_score: float = 0.05  # a neighbour sharing almost no n-gram with the question only misleads
    same_intent: bool = True  # only neighbours of the intent most of the nearest five share
    vote_top: int = 5  # neighbours that vote on the intent
    # Prompt budget in tokens (training, evaluation and serving; serving also keeps room for the
    # reply: min(this, window - max_new_tokens)). 768 fits 2 answers of 200 tokens and a long question.
    max_prompt_tokens: int = 768
    # The reply starts with the closest answer's first sentence (``reply_prime``): with it SmolLM2's
    # replies had the customer's intent 97% of the time, without it 50% (docs/quality-research.md, E4).
    prime: bool = True


@dataclass(frozen=True)
class GroundedPrompt:
    turns: list[dict[str, str]]  # the conversation with the grounding in its system turn
    text: str  # render_prompt(turns): what the model continues
    token_count: int
    used: list[Neighbour] = field(default_factory=list)  # the exchanges shown, closest first (logged with the reply)
    intent: str = ""  # the intent the neighbours voted for ("" without intents)
    intent_share: float = 0.0  # its share of the vote (0..1): retrieval's confidence


def select_neighbours(hits: Sequence[Neighbour], config: GroundingConfig) -> tuple[list[Neighbour], str, float]:
    """The neighbours to show (closest first), the voted intent and its share."""
    intent, share = intent_vote(hits, top=config.vote_top)
    chosen = [h for h in hits if h.score >= config.min_score]
    if config.same_intent and intent:
        chosen = [h for h in chosen if h.exchange.intent == intent]
    return chosen[: config.neighbours], intent, share


def grounding_block(neighbours: Sequence[Neighbour], tokenizer, answer_tokens: int) -> str:
    """The text added to the system turn for ``neighbours`` (closest first); "" for none."""
    if not neighbours:
        return ""
    parts = [BLOCK_HEADER]
    for hit in reversed(neighbours):  # the closest last, next to the conversation
        answer = _cut_tokens(hit.exchange.reply.strip(), tokenizer, answer_tokens)
        parts.append(f"Similar question: {hit.exchange.question.strip()}\nAnswer: {answer}")
    return "\n\n".join(parts)


def ground(
    messages: Sequence[Mapping[str, str]],
    hits: Sequence[Neighbour],
    tokenizer,
    *,
    config: GroundingConfig | None = None,
    max_prompt_tokens: int,
) -> GroundedPrompt:
    """The conversation ``messages`` (ending with the customer's turn) grounded on ``hits``.

    ``hits`` are the index's results for ``retrieval_query(messages)``, best first.
    """
    config = config or GroundingConfig()
    chosen, intent, share = select_neighbours(hits, config)
    turns = normalise_messages(messages)
    system = turns[0]["content"] if turns and turns[0]["role"] == ROLE_SYSTEM else ""
    history = turns[1:] if system else turns
    if not history:
        raise ValueError("A grounded prompt needs at least one customer turn.")

    def build(neighbours: list[Neighbour], kept: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, int]:
        block = grounding_block(neighbours, tokenizer, config.answer_tokens)
        content = "\n\n".join(part for part in (system, block) if part)
        grounded = ([{"role": ROLE_SYSTEM, "content": content}] if content else []) + kept
        text = render_prompt(grounded, tokenizer)
        return grounded, text, len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Oldest turns go first (history restarts at a customer turn), then farther neighbours.
    starts = [0] + [i for i, t in enumerate(history) if i > 0 and t["role"] != ROLE_AGENT]
    for start in starts:
        kept = history[start:]
        for n in range(len(chosen), -1, -1):
            grounded, text, count = build(chosen[:n], kept)
            if count <= max_prompt_tokens or (n == 0 and start == starts[-1]):
                return GroundedPrompt(grounded, text, count, chosen[:n], intent, share)
            if n == 1 and start != starts[-1]:
                break  # not even one neighbour fits: drop old turns before dropping the last neighbour
    raise AssertionError("unreachable: the last attempt always returns")


def ground_conversation(
    messages: Sequence[Mapping[str, str]],
    index,
    tokenizer,
    *,
    config: GroundingConfig | None = None,
    max_prompt_tokens: int,
    k: int = SEARCH_K,
    exclude: int | None = None,
) -> tuple[GroundedPrompt, list[Neighbour]]:
    """Search ``index`` for the conversation and ground it: the one entry point of training, evaluation and serving.

    Returns the grounded prompt and every hit (the reply policy chooses among them).
    ``index`` None (a version trained before grounding) gives the plain prompt of the
    conversation and no hits. ``exclude`` is the conversation's own row in the index
    (training only: an example is never grounded on itself).
    """
    hits = index.search(retrieval_query(messages), k, exclude=exclude) if index is not None else []
    return ground(messages, hits, tokenizer, config=config, max_prompt_tokens=max_prompt_tokens), hits


def reply_prime(prompt: GroundedPrompt) -> str:
    """How the reply starts: the first sentence of the closest answer shown ("" without one).

    Generation continues from it (the engine appends it to ``prompt.text`` and streams it
    first). It puts a small model on the track of the right answer: with it SmolLM2's own
    replies had the customer's intent 97% of the time on the Bitext split, without it 50-64%
    (docs/quality-research.md, E4).
    """
    if not prompt.used:
        return ""
    answer = prompt.used[0].exchange.reply.strip()
    match = _SENTENCE_END_RE.search(answer)
    return answer[: match.end()] if match else answer


_SENTENCE_END_RE = re.compile(r"[.!?](?:\s|$)|\n")


def _cut_tokens(text: str, tokenizer, limit: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return text
    cut = tokenizer.decode(ids[:limit])
    # End at a line or sentence boundary when one is near, so the cut reads as a whole step.
    for mark in ("\n", ". "):
        at = cut.rfind(mark)
        if at > len(cut) * 0.6:
            return cut[: at + 1].rstrip()
    return cut.rstrip()
