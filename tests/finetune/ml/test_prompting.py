"""The prompt template shared by training and chat: rendering, splitting and tokenizing."""

from __future__ import annotations

import pytest

from finetune.ml import prompting
from finetune.ml.prompting import (
    IGNORE_INDEX,
    render_example,
    render_prompt,
    system_prompt_text,
    tokenize_example,
    tokenize_examples,
)

CONVERSATION = [
    {"role": "system", "content": "You are the assistant of Acme."},
    {"role": "customer", "content": "Where is my order?"},
    {"role": "agent", "content": "Which order number?"},
    {"role": "customer", "content": "{{ORDER_ID}}"},
    {"role": "agent", "content": "It shipped yesterday."},
]


@pytest.mark.parametrize(
    ("which", "completion"),
    [
        # Plain template: the reply follows "Agent:" after a space and ends with the EOS token.
        ("ticket_tokenizer", " It shipped yesterday.<|endoftext|>"),
        # ChatML: the reply is the assistant turn's content, closed as the template closes every turn.
        ("ticket_chat_tokenizer", "It shipped yesterday.<|im_end|>\n"),
    ],
)
def test_example_prompt_is_exactly_what_the_chat_sends(which, completion, request):
    tokenizer = request.getfixturevalue(which)
    example = render_example(CONVERSATION, tokenizer)
    assert example.prompt == render_prompt(CONVERSATION[:-1], tokenizer)
    assert example.completion == completion


def test_the_one_render_split_agrees_with_two_renders(ticket_chat_tokenizer):
    prompting._SPLIT_CHECKED.clear()
    first = render_example(CONVERSATION, ticket_chat_tokenizer)  # two renders, then the shape is checked
    assert prompting._SPLIT_CHECKED
    assert all(prompting._SPLIT_CHECKED.values())
    other = [*CONVERSATION[:-1], {"role": "agent", "content": "It left our warehouse on Monday."}]
    fast = render_example(other, ticket_chat_tokenizer)  # the same shape: one render
    assert fast.prompt == first.prompt
    assert fast.completion == first.completion.replace("It shipped yesterday.", "It left our warehouse on Monday.")


def test_a_template_that_changes_history_falls_back_to_two_renders(ticket_chat_tokenizer):
    """A template that renders the last assistant turn differently is never split by marker."""
    prompting._SPLIT_CHECKED.clear()
    tokenizer = ticket_chat_tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace(
        "message['content']", "(message['content'] + ('!' if loop.last else ''))"
    )
    try:
        with pytest.raises(ValueError, match="renders history differently"):
            render_example(CONVERSATION, tokenizer)
    finally:
        tokenizer.chat_template = original


def test_batch_tokenizing_equals_one_by_one(ticket_chat_tokenizer):
    examples = [render_example(CONVERSATION, ticket_chat_tokenizer)] * 3
    for max_length in (1 << 30, 12):
        one = tokenize_example(examples[0], ticket_chat_tokenizer, max_length=max_length)
        assert tokenize_examples(examples, ticket_chat_tokenizer, max_length=max_length) == [one] * 3
    short = tokenize_example(examples[0], ticket_chat_tokenizer, max_length=12)
    assert len(short["input_ids"]) == 12
    assert short["labels"][-1] != IGNORE_INDEX  # the reply is kept, the history cut


def test_system_prompt_fills_company_and_appends_policy():
    assert system_prompt_text(template="Help {company} customers.", company="Acme") == "Help Acme customers."
    text = system_prompt_text(template="Help {company}.", company="Acme", policy=" Refunds in 30 days. ")
    assert text == "Help Acme.\n\nPolicies:\nRefunds in 30 days."
