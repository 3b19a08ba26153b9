"""Grounding a chat reply on the served version's retrieval index, and its reply policy. Plain Python.

The serving side of issue 10's recipe (docs/quality-research.md), built from the same
parts as the evaluation (``finetune.ml.quality``), so what the gate scores is what
customers get:

1. ``ground_request``: the nearest past exchanges (``grounding.ground_conversation``,
   k=8) go into the prompt within the context budget (the version's
   ``GroundingConfig.max_prompt_tokens``, and never more than the window leaves after
   the reply), and the reply starts with the closest answer's first sentence
   (``reply_prime``), which then counts against the budget too;
2. ``reply_decider``: ``reply_policy.choose_reply`` bound to this reply's neighbours;
   the pipeline (``finetune.serving.safety.ReplyPipeline``) asks it once the model's
   first sentence is written (``partial=True``), or at the end of a shorter reply.

A version without ``retrieval/`` has ``LoadedModel.index`` None: ``ground_request``
returns None and the reply is served as before grounding (plain prompt, no policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.ml.grounding import SEARCH_K, ground, ground_conversation, reply_prime
from finetune.ml.quality import prime_join
from finetune.ml.reply_policy import ReplyPolicyConfig, choose_reply
from finetune.ml.retrieval import Neighbour

from .loading import LoadedModel, context_window
from .text import MIN_PROMPT_TOKENS, token_budget

# Characters of a neighbour's question and answer kept in the reply's log (what agents read).
LOG_TEXT_CHARS = 600


@dataclass
class Grounding:
    """One reply's grounding: the turns to send, how the reply starts, and what was found."""

    messages: list[dict[str, str]]  # the conversation with the neighbours in its system turn
    prime: str  # the reply's given start ("" when none)
    hits: list[Neighbour] = field(default_factory=list)  # every neighbour found, best first (the policy's)
    used: list[Neighbour] = field(default_factory=list)  # the neighbours shown to the model, closest first
    intent: str = ""  # the intent the neighbours voted for
    token_count: int = 0  # prompt tokens before the prime

    def log(self) -> list[dict[str, Any]]:
        """What the reply records of its grounding (``Message.grounding``): origin, score, intent, texts."""
        return [
            {
                "origin": hit.exchange.origin,
                "score": round(hit.score, 4),
                "intent": hit.exchange.intent,
                "question": hit.exchange.question[:LOG_TEXT_CHARS],
                "answer": hit.exchange.reply[:LOG_TEXT_CHARS],
            }
            for hit in self.used
        ]


def ground_request(
    loaded: LoadedModel, messages: Sequence[Mapping[str, str]], max_new_tokens: int, *, k: int = SEARCH_K
) -> Grounding | None:
    """The grounded turns and prime for a reply to ``messages``; None when the version has no index."""
    if loaded.index is None:
        return None
    tokenizer, config = loaded.tokenizer, loaded.grounding
    max_prompt, _ = token_budget(context_window(loaded), max_new_tokens)
    budget = min(config.max_prompt_tokens, max_prompt)
    prompt, hits = ground_conversation(messages, loaded.index, tokenizer, config=config, max_prompt_tokens=budget, k=k)
    prime = reply_prime(prompt).strip() if config.prime else ""
    if prime:
        extra = len(tokenizer(prime_join(prime, tokenizer), add_special_tokens=False)["input_ids"])
        if prompt.token_count + extra > max_prompt:
            # A small window: make room for the prime by grounding on less (farther neighbours go first).
            prompt = ground(
                messages, hits, tokenizer, config=config, max_prompt_tokens=max(MIN_PROMPT_TOKENS, max_prompt - extra)
            )
            prime = reply_prime(prompt).strip() if prompt.used else ""
    return Grounding(
        messages=prompt.turns,
        prime=prime,
        hits=list(hits),
        used=list(prompt.used),
        intent=prompt.intent,
        token_count=prompt.token_count,
    )


def reply_decider(
    config: ReplyPolicyConfig, hits: Sequence[Neighbour], *, handoff_logprob: float | None = None
) -> Callable[..., Any]:
    """``choose_reply`` bound to one reply's neighbours: ``decide(model_text, mean_logprob, partial=...)``.

    ``handoff_logprob`` (the chat's ``SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD``) replaces the
    version's, so one setting decides when an unsure reply goes to a person.
    """
    if handoff_logprob is not None:
        config = dataclasses.replace(config, handoff_logprob=handoff_logprob)
    hits = list(hits)

    def decide(model_text: str, mean_logprob: float | None, *, partial: bool = False):
        return choose_reply(model_text, mean_logprob, hits, config, partial=partial)

    return decide
