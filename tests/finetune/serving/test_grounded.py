"""Grounding a chat request on the served version's index: neighbours in the prompt, within budget, primed."""

from __future__ import annotations

import dataclasses

from finetune.ml.grounding import GroundingConfig, ground_conversation, reply_prime
from finetune.ml.reply_policy import ReplyPolicyConfig
from finetune.ml.retrieval import Exchange, RetrievalIndex
from finetune.serving.grounded import ground_request, reply_decider
from finetune.serving.loading import context_window
from finetune.serving.text import prompt_ids_for, token_budget
from tests.finetune.serving.engine_models import conversation, load, tiny_gpt2_dir

PAST = [
    Exchange("where is my order", "Your order left our warehouse. It arrives within two days.", "track", "ticket:t:1"),
    Exchange("where is my parcel order", "Your order is on its way. Track it in your account.", "track", "ticket:t:2"),
    Exchange("reset my password", "Use the Forgot password link. Then follow the e-mail.", "reset", "ticket:t:3"),
]


def loaded_with_index(**grounding):
    loaded = load(tiny_gpt2_dir())
    loaded.index = RetrievalIndex.build(PAST)
    loaded.grounding = GroundingConfig(**grounding)
    return loaded


def test_without_an_index_nothing_is_grounded():
    assert ground_request(load(tiny_gpt2_dir()), conversation("Where is my order?"), 40) is None


def test_the_request_is_grounded_as_the_evaluation_grounds_it_and_primed():
    loaded = loaded_with_index()
    messages = conversation("Where is my order?")
    grounding = ground_request(loaded, messages, 40)
    prompt, hits = ground_conversation(
        messages, loaded.index, loaded.tokenizer, config=loaded.grounding, max_prompt_tokens=768
    )
    assert grounding.messages == prompt.turns  # the one prompt builder
    assert [h.exchange.origin for h in grounding.hits] == [h.exchange.origin for h in hits]
    assert grounding.used[0].exchange.origin == "ticket:t:1"
    assert {h.exchange.intent for h in grounding.used} == {"track"}  # the voted intent only
    assert "Your order left our warehouse." in grounding.messages[0]["content"]
    assert grounding.prime == "Your order left our warehouse."
    log = grounding.log()
    assert [entry["origin"] for entry in log] == [h.exchange.origin for h in grounding.used]
    assert set(log[0]) == {"origin", "score", "intent", "question", "answer"}


def test_the_grounded_prompt_and_its_prime_fit_what_the_window_leaves_for_the_reply():
    loaded = loaded_with_index()
    window = context_window(loaded)
    # A reply limit that leaves little room: farther neighbours are dropped, the prime still fits.
    max_new = window - 120
    messages = conversation("Where is my order? " + "It was a birthday present for my sister. " * 3)
    grounding = ground_request(loaded, messages, max_new)
    max_prompt, _ = token_budget(window, max_new)
    ids = prompt_ids_for(loaded, grounding.messages, max_prompt, grounding.prime)
    assert len(ids) <= max_prompt
    assert len(grounding.used) < 2
    # Nothing was cut off the front by the engine's last guard: the prompt starts as rendered.
    assert loaded.tokenizer.decode(ids).startswith("System:")


def test_no_prime_when_the_version_says_so():
    assert ground_request(loaded_with_index(prime=False), conversation("Where is my order?"), 40).prime == ""


def test_the_decider_is_the_reply_policy_with_the_chats_handoff_threshold():
    loaded = loaded_with_index()
    hits = loaded.index.search("where is my order", 8)
    config = dataclasses.replace(ReplyPolicyConfig(), mode="fallback", fallback_logprob=-0.5, fallback_score=0.3)
    decide = reply_decider(config, hits, handoff_logprob=-9.0)
    unsure = decide("I am not sure.", -2.0, partial=True)
    assert (unsure.source, unsure.origin) == ("retrieved", "ticket:t:1")
    assert decide("Your order ships today.", -0.1, partial=True).source == "model"
    lonely = reply_decider(config, [], handoff_logprob=-9.0)
    assert lonely("Hmm.", -5.0).source == "model"  # -5 is above the chat's -9: no handoff
    assert reply_decider(config, [], handoff_logprob=-1.0)("Hmm.", -5.0).source == "handoff"


def test_serving_sends_the_model_the_same_tokens_the_evaluation_scores():
    from finetune.ml.quality import prime_join, quality_examples

    loaded = loaded_with_index()
    messages = conversation("Where is my order?")
    example = quality_examples(
        [[*messages, {"role": "agent", "content": "It ships today."}]],
        ["track"],
        loaded.index,
        loaded.tokenizer,
        grounding=loaded.grounding,
    )[0]
    evaluated = loaded.tokenizer(example.prompt.text + prime_join(reply_prime(example.prompt), loaded.tokenizer))

    grounding = ground_request(loaded, messages, 40)
    max_prompt, _ = token_budget(context_window(loaded), 40)
    served = prompt_ids_for(loaded, grounding.messages, max_prompt, grounding.prime)
    assert served == evaluated["input_ids"]
