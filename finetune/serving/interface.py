"""The inference engine's interface: submit a request, get an async stream of events.

The chat consumer depends only on this module. The engine behind it (in-process
by default: ``finetune.serving.batched`` or ``finetune.serving.naive``) can later
move into separate worker processes without the consumer changing.

    engine = ...  # anything implementing Engine
    async for event in engine.stream(GenerationRequest(key=conversation_id, messages=turns)):
        if isinstance(event, TokenDelta):
            send(event.text)
        else:  # GenerationDone, always the last event
            save(event)
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 160  # a support reply of a few sentences
    temperature: float = 0.0  # greedy: the same question gets the same vetted answer
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # extra stop strings besides the template's own
    timeout_s: float = 60.0  # wall-clock limit of the whole reply
    # Most prompt tokens the model reads (besides the context window's own limit); None: the
    # window's. Every prompt token costs prefill time, which the batch's other replies wait for.
    max_prompt_tokens: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate. ``messages`` use the roles of ``finetune.ml.prompting``."""

    key: str  # the conversation id: one generation at a time per key
    messages: list[dict[str, str]]
    params: GenerationParams = field(default_factory=GenerationParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # How the reply starts (the closest retrieved answer's first sentence, ``grounding.reply_prime``):
    # the engine puts it after the prompt, streams it first and generates its continuation.
    prime: str = ""
    # The conversation's language (ISO 639-1; the label stored with the customer's latest message):
    # the reply pipeline writes the neutral words of unfillable slots in it. "": detected from messages.
    language: str = ""


@dataclass(frozen=True)
class TokenDelta:
    """New reply text, in order; concatenated deltas equal ``GenerationDone.text``."""

    text: str
    # Mean log-probability of the tokens generated so far (None: not known). The reply policy
    # reads it when it decides on the first sentence, before the whole reply exists.
    mean_logprob: float | None = None


@dataclass(frozen=True)
class GenerationDone:
    """The last event of every stream, also after a failure, timeout or cancel."""

    text: str
    finish_reason: str  # "stop", "length", "timeout", "cancelled" or "error"
    token_count: int
    mean_logprob: float | None  # mean log-probability of the generated tokens (confidence)
    model_label: str  # e.g. "v3"; what produced the reply
    first_token_ms: int | None
    latency_ms: int
    error: str = ""
    # Set by the reply pipeline (``finetune.serving.safety.SafeEngine``), not by the engines:
    cut_reason: str = ""  # "" or where a repeating reply was cut: "sentence", "loop", "ngram"
    source: str = "model"  # "model" or "retrieved" (a past exchange's answer went out instead)
    source_origin: str = ""  # the retrieved exchange's origin when source == "retrieved"
    policy: dict = field(default_factory=dict)  # the reply policy's choice (reason, score, intent)
    grounding: list = field(default_factory=list)  # the exchanges the prompt was grounded on
    handoff: bool = False  # the reply policy found no usable reply: a person takes over


class EngineBusy(RuntimeError):
    """A generation for the same key is already running."""


class Engine(Protocol):
    @property
    def model_label(self) -> str | None:
        """Label of the model currently served, or None when none is loaded."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        """Generate a reply; raises EngineBusy if ``request.key`` already has one running."""

    async def cancel(self, request_id: str) -> None:
        """Stop a running request early (the customer left); its stream ends with 'cancelled'."""
