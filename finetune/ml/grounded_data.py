"""Grounded training examples: each training conversation with its nearest *other* exchanges in the prompt.

The adapter learns to adapt a known-good answer to this customer, on exactly the prompt
shape serving builds (``finetune.ml.grounding.ground``). An example is never grounded
on itself (``exclude`` its own row): at serving time the customer's question is new,
so the training prompt must not hold the answer verbatim.

    index = RetrievalIndex.build(exchanges_from_conversations(train_messages, intents))
    examples = grounded_examples(train_messages, index, tokenizer, max_length=768)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from finetune.ml.prompting import IGNORE_INDEX, ROLE_AGENT, normalise_messages, render_example, tokenize_examples
from finetune.ml.training import Example

from .grounding import SEARCH_K, GroundingConfig, ground
from .retrieval import RetrievalIndex, retrieval_query


def grounded_examples(
    conversations: Sequence[Any],
    index: RetrievalIndex,
    tokenizer,
    *,
    max_length: int,
    config: GroundingConfig | None = None,
    positions: Sequence[int | None] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Render and tokenize grounded examples; conversations that cannot be rendered are skipped.

    ``positions[i]`` is conversation i's own row in ``index`` (None when it is not in it);
    by default conversation i is row i, as when the index was built from these conversations
    in order (``exchanges_from_conversations`` skips only unusable ones; pass positions then).
    """
    config = config or GroundingConfig()
    order = list(range(len(conversations)))
    if limit is not None and limit < len(order):
        order = sorted(random.Random(seed).sample(order, limit))  # noqa: S311 - reproducible sampling
    turns_list, queries, excludes = [], [], []
    for i in order:
        try:
            turns = normalise_messages(conversations[i])
        except (ValueError, KeyError, TypeError):
            continue
        if len(turns) < 2 or turns[-1]["role"] != ROLE_AGENT:
            continue
        turns_list.append(turns)
        queries.append(retrieval_query(turns[:-1]))
        excludes.append(positions[i] if positions is not None else i)
    hits = index.search_many(queries, SEARCH_K, exclude=excludes)
    rendered, references, questions = [], [], []
    for turns, found, query in zip(turns_list, hits, queries, strict=True):
        reply = turns[-1]
        reply_tokens = len(tokenizer(reply["content"], add_special_tokens=False)["input_ids"]) + 8
        # The serving budget, unless the reply needs more of max_length: then the prompt gives way.
        budget = max(32, min(config.max_prompt_tokens, max_length - reply_tokens))
        prompt = ground(turns[:-1], found, tokenizer, config=config, max_prompt_tokens=budget)
        try:
            rendered.append(render_example([*prompt.turns, reply], tokenizer))
        except ValueError:
            continue
        references.append(reply["content"])
        questions.append(query)
    examples: list[Example] = []
    for item, tokens, question, reference in zip(
        rendered, tokenize_examples(rendered, tokenizer, max_length=max_length), questions, references, strict=True
    ):
        if tokens is None or not any(label != IGNORE_INDEX for label in tokens["labels"][1:]):
            continue
        examples.append(
            Example(
                input_ids=tokens["input_ids"],
                labels=tokens["labels"],
                prompt=item.prompt,
                question=question,
                reference=reference,
            )
        )
    return examples


def own_positions(conversations: Sequence[Any], index: RetrievalIndex) -> list[int | None]:
    """Each conversation's own row in ``index`` (None when it is not there), matched on question and reply.

    The dataset's index is built from the train split with ``exchanges_from_conversations``,
    which skips unusable rows, so row numbers cannot be assumed; the content can. Identical
    exchanges map to one row each, in order.
    """
    rows: dict[tuple[str, str], list[int]] = {}
    for position, exchange in enumerate(index.exchanges):
        rows.setdefault((exchange.question, exchange.reply), []).append(position)
    taken: dict[tuple[str, str], int] = {}
    positions: list[int | None] = []
    for raw in conversations:
        key = None
        if isinstance(raw, list) and raw and isinstance(raw[-1], dict) and raw[-1].get("role") == ROLE_AGENT:
            key = (retrieval_query(raw[:-1]), (raw[-1].get("content") or "").strip())
        found = rows.get(key, []) if key else []
        used = taken.get(key, 0) if key else 0
        positions.append(found[used] if used < len(found) else None)
        if key and found:
            taken[key] = used + 1
    return positions
