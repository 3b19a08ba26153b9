"""Fitting a conversation into the context window: whole turns dropped oldest first, both engines alike."""

from __future__ import annotations

from finetune.ml.prompting import render_prompt
from finetune.serving.text import prompt_ids_for, token_budget, trim_messages
from tests.finetune.serving.engine_models import (
    SYSTEM,
    assert_same_reply,
    collect,
    conversation,
    naive_replies,
    request,
)


def test_token_budget_leaves_room_for_the_reply():
    assert token_budget(1024, 160) == (864, 160)
    assert token_budget(128, 500) == (16, 112)  # an absurd max_new_tokens still leaves a prompt


def test_trim_drops_whole_turns_oldest_first_and_keeps_the_system_prompt(gpt2):
    tokenizer = gpt2.tokenizer
    history = []
    for i in range(30):
        history.append(f"Question number {i}: where is my parcel with the blue box?")
        history.append(f"Answer number {i}: it ships tomorrow morning from the warehouse.")
    messages = conversation("Latest question about my refund?", *history)
    full = len(tokenizer(render_prompt(messages, tokenizer))["input_ids"])
    trimmed = trim_messages(messages, tokenizer, 300)
    assert full > 300
    assert len(tokenizer(render_prompt(trimmed, tokenizer))["input_ids"]) <= 300
    assert trimmed[0] == SYSTEM
    assert trimmed[-1] == messages[-1]
    assert trimmed[1]["role"] == "customer"  # no orphan agent reply at the start
    kept = trimmed[1:]
    assert kept == messages[len(messages) - len(kept) :]  # the newest turns, whole and in order
    # As many turns as fit: one more customer/agent pair would not.
    assert len(tokenizer(render_prompt([SYSTEM, *messages[-len(kept) - 2 :]], tokenizer))["input_ids"]) > 300
    assert trim_messages(messages, tokenizer, 10_000) == messages


def test_trim_cuts_a_single_overlong_turn_in_the_middle_with_a_note(gpt2):
    tokenizer = gpt2.tokenizer
    long_question = "Hello, order 5512 here. " + " ".join(f"word{i}" for i in range(400)) + " so where is my order?"
    trimmed = trim_messages(conversation(long_question), tokenizer, 200)
    assert trimmed[0] == SYSTEM
    text = trimmed[-1]["content"]
    assert text.startswith("Hello, order 5512")  # the beginning and
    assert text.endswith("so where is my order?")  # the end are kept,
    assert "tokens of this message were cut" in text  # the middle says it was cut
    assert len(tokenizer(render_prompt(trimmed, tokenizer))["input_ids"]) <= 200


def test_the_prompt_budget_drops_history_first_then_cuts_the_message(gpt2):
    tokenizer = gpt2.tokenizer
    assert token_budget(512, 40, 300) == (300, 40)
    assert token_budget(512, 40, 1000) == (472, 40)  # the window still rules
    assert token_budget(512, 40, 3) == (16, 40)  # never no prompt at all

    history = [f"Turn {i} talks about order {i}." for i in range(10)]
    short = conversation("Where is it?", *history)
    max_prompt, _ = token_budget(512, 40, 120)
    kept = trim_messages(short, tokenizer, max_prompt)
    assert kept[-1] == short[-1]  # the question is whole: the history made room
    assert len(kept) < len(short)

    emoji = "\U0001f600\U0001f4e6\U0001f525\U0001f9fe" * 1024  # 4,096 characters, several tokens each
    ids = prompt_ids_for(gpt2, conversation(emoji, *history), max_prompt)
    assert len(tokenizer(emoji, add_special_tokens=False)["input_ids"]) > 4 * max_prompt
    assert len(ids) <= max_prompt
    text = gpt2.tokenizer.decode(ids)
    assert text.startswith("System: You are the support assistant of Acme.")
    assert "Turn 0" not in text  # history went first
    assert "tokens of this message were cut" in text


async def test_both_engines_trim_an_overlong_conversation_the_same_way(engine, gpt2):
    history = [f"Turn {i} talks about order {i} and its delivery to the shop." for i in range(80)]
    messages = conversation("So where is it?", *history)
    max_prompt, _ = token_budget(512, 40)
    ids = prompt_ids_for(gpt2, messages, max_prompt)
    assert len(ids) <= max_prompt
    assert gpt2.tokenizer.decode(ids).startswith("System: You are the support assistant of Acme.")
    (want,) = await naive_replies(gpt2, [messages], max_new_tokens=40)
    _, got = await collect(engine, request("long", messages, max_new_tokens=40))
    assert_same_reply(got, want)


def test_a_primed_reply_starts_with_the_prime_and_keeps_the_continuation_apart():
    from finetune.serving.text import ReplyText
    from tests.finetune.serving.engine_models import load, tiny_gpt2_dir

    tokenizer = load(tiny_gpt2_dir()).tokenizer
    for continuation, expected in (
        ("Your order", "Sure. Your order"),  # no space of its own: one is put in
        (" Your order", "Sure. Your order"),
        (", your order", "Sure., your order"),  # punctuation stays attached
    ):
        reply = ReplyText(tokenizer, ("\nCustomer:",), prefix="Sure. ")
        shown = "".join(reply.push(i) for i in tokenizer(continuation, add_special_tokens=False)["input_ids"])
        shown += reply.flush()
        assert shown == reply.text == expected
    empty = ReplyText(tokenizer, (), prefix="Sure.")
    assert empty.flush() == "Sure."  # the model ended at once: the prime is the reply
