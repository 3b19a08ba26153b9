"""What fine-tuning and serving read from the chat, supplied by the chat app.

``finetune`` never imports ``conversations`` (an import-linter contract holds it):
the chat is downstream of the model, so ``conversations`` registers these readers in
its ``AppConfig.ready()`` with ``chat_data_register``:

- ``feedback_examples(since=...)``: the bot replies agents approved or corrected, as
  ``SourceConversation``\\s for dataset builds;
- ``system_prompt()``: the system prompt the chat sends, so training examples start
  the way chats do;
- ``blocked_terms()``: the terms the bot profile masks in every reply (safety filter);
- ``company_facts()``: the bot profile's facts (``company_name``, ``support_phone``,
  ``support_email``, ``website_url``, ``support_hours``, ``returns_address``) that fill
  the template slots of replies (``finetune.serving.placeholders``).

Until they are registered (the chat app not installed), a build has no feedback and
no system prompt, the filter masks no terms, and slots become neutral words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from .ml.dataset_builder import SourceConversation


def _no_feedback(*, since: datetime | None = None) -> Iterable[SourceConversation]:
    return ()


@dataclass(frozen=True)
class ChatData:
    feedback_examples: Callable[..., Iterable[SourceConversation]] = _no_feedback
    system_prompt: Callable[[], str | None] = lambda: None
    blocked_terms: Callable[[], list[str]] = list
    company_facts: Callable[[], dict[str, str]] = dict


_chat_data = ChatData()


def chat_data_register(
    *,
    feedback_examples: Callable[..., Iterable[SourceConversation]],
    system_prompt: Callable[[], str | None],
    blocked_terms: Callable[[], list[str]],
    company_facts: Callable[[], dict[str, str]] = dict,
) -> None:
    """Install the chat app's readers (called once, from its ``AppConfig.ready()``)."""
    global _chat_data
    _chat_data = ChatData(
        feedback_examples=feedback_examples,
        system_prompt=system_prompt,
        blocked_terms=blocked_terms,
        company_facts=company_facts,
    )


def chat_data() -> ChatData:
    return _chat_data
