"""The grounded prompt: neighbours in the system turn within the token budget, identical in training and serving."""

from __future__ import annotations

import pytest

from finetune.ml.grounded_data import grounded_examples
from finetune.ml.grounding import BLOCK_HEADER, GroundingConfig, ground
from finetune.ml.prompting import render_example, render_prompt
from finetune.ml.retrieval import Exchange, Neighbour, RetrievalIndex, exchanges_from_conversations

SYSTEM = {"role": "system", "content": "You are the support assistant of Acme."}


def hit(question, reply, intent, score, position=0):
    return Neighbour(Exchange(question, reply, intent), score, position)


HITS = [
    hit("my parcel has not arrived", "Track it under Orders > Tracking.", "track_order", 0.8, 1),
    hit("where is my package", "The courier's link is in your e-mail.", "track_order", 0.7, 2),
    hit("refund for a late parcel", "Refunds are under Orders > Return.", "get_refund", 0.6, 3),
    hit("parcel late", "Parcels take 3-5 days.", "track_order", 0.5, 4),
]


@pytest.fixture(params=["plain", "chat"])
def tokenizer(request, ticket_tokenizer, ticket_chat_tokenizer):
    return ticket_tokenizer if request.param == "plain" else ticket_chat_tokenizer


def test_closest_neighbours_of_the_voted_intent_go_into_the_system_turn(tokenizer):
    messages = [SYSTEM, {"role": "customer", "content": "my parcel still isn't here"}]

    prompt = ground(messages, HITS, tokenizer, config=GroundingConfig(neighbours=2), max_prompt_tokens=2000)

    assert [h.position for h in prompt.used] == [1, 2]  # the refund answer is left out
    assert prompt.intent == "track_order"
    system = prompt.turns[0]["content"]
    assert system.startswith(SYSTEM["content"])
    assert BLOCK_HEADER in system
    # The closest is written last, next to the customer's question.
    assert system.index("The courier's link") < system.index("Track it under Orders")
    assert "Refunds are under" not in system
    assert prompt.text == render_prompt(prompt.turns, tokenizer)


def test_prompt_stays_within_the_budget_dropping_the_farthest_neighbour_first(tokenizer):
    messages = [SYSTEM, {"role": "customer", "content": "my parcel still isn't here"}]
    full = ground(messages, HITS, tokenizer, config=GroundingConfig(neighbours=2), max_prompt_tokens=5000)
    bare = ground(messages, [], tokenizer, max_prompt_tokens=5000)

    one = ground(
        messages, HITS, tokenizer, config=GroundingConfig(neighbours=2), max_prompt_tokens=full.token_count - 1
    )

    assert [h.position for h in one.used] == [1]
    assert bare.token_count < one.token_count <= full.token_count - 1
    assert len(tokenizer(one.text, add_special_tokens=False)["input_ids"]) == one.token_count
    none = ground(messages, HITS, tokenizer, config=GroundingConfig(neighbours=2), max_prompt_tokens=bare.token_count)
    assert none.used == []
    assert none.token_count == bare.token_count


def test_long_history_loses_old_turns_before_the_last_neighbour(tokenizer):
    history = []
    for i in range(6):
        history += [
            {"role": "customer", "content": f"question {i} " * 10},
            {"role": "agent", "content": f"answer {i} " * 10},
        ]
    messages = [SYSTEM, *history, {"role": "customer", "content": "my parcel still isn't here"}]
    short = ground(messages[:1] + messages[-1:], HITS[:1], tokenizer, max_prompt_tokens=5000)

    prompt = ground(messages, HITS[:1], tokenizer, max_prompt_tokens=short.token_count + 40)

    assert [h.position for h in prompt.used] == [1]
    assert prompt.turns[-1]["content"] == "my parcel still isn't here"
    assert prompt.token_count <= short.token_count + 40
    assert prompt.turns[1]["role"] == "customer"  # history restarts at a customer turn


def test_answers_longer_than_the_limit_are_cut(tokenizer):
    long = hit("parcel?", "Step one is to open the app. " * 80, "track_order", 0.9)
    messages = [{"role": "customer", "content": "parcel?"}]

    prompt = ground(messages, [long], tokenizer, config=GroundingConfig(answer_tokens=30), max_prompt_tokens=5000)

    assert prompt.used
    assert prompt.turns[0]["content"].count("Step one") < 20


def test_training_examples_are_grounded_on_others_and_render_as_serving_does(tokenizer):
    conversations = [
        [SYSTEM, {"role": "customer", "content": q}, {"role": "agent", "content": r}]
        for q, r in [
            ("my parcel has not arrived", "Track it under Orders > Tracking."),
            ("my parcel has still not arrived", "The courier's link is in your e-mail."),
            ("how do i reset my password", "Use Forgot password on the sign-in page."),
            ("password reset please", "A reset link is on its way to your e-mail."),
        ]
    ]
    intents = ["track_order", "track_order", "recover_password", "recover_password"]
    index = RetrievalIndex.build(exchanges_from_conversations(conversations, intents))

    examples = grounded_examples(conversations, index, tokenizer, max_length=512)

    assert len(examples) == 4
    first = examples[0]
    # Grounded on its neighbour, never on its own answer.
    assert "The courier's link" in first.prompt
    assert "Track it under Orders" not in first.prompt
    # The serving path builds the same prompt for the same conversation and neighbours.
    hits = index.search("my parcel has not arrived", k=8, exclude=0)
    served = ground(conversations[0][:-1], hits, tokenizer, max_prompt_tokens=512 - 40)
    assert first.prompt == served.text
    assert render_example([*served.turns, conversations[0][-1]], tokenizer).prompt == served.text


def test_reply_starts_with_the_closest_answers_first_sentence(tokenizer):
    from finetune.ml.grounding import reply_prime

    messages = [SYSTEM, {"role": "customer", "content": "my parcel still isn't here"}]
    hits = [hit("parcel late", "I'm sorry it is late. Track it under Orders.", "track_order", 0.9, 7)]

    prompt = ground(messages, hits, tokenizer, max_prompt_tokens=2000)

    assert reply_prime(prompt) == "I'm sorry it is late. "
    assert reply_prime(ground(messages, [], tokenizer, max_prompt_tokens=2000)) == ""
