"""The reply policy: model reply, a retrieved answer or a handoff, decided the same way in evaluation and serving."""

from __future__ import annotations

import json

import pytest

from finetune.ml.reply_policy import (
    SOURCE_HANDOFF,
    SOURCE_MODEL,
    SOURCE_RETRIEVED,
    ReplyPolicyConfig,
    agreement,
    choose_reply,
    consensus,
    first_model_sentence,
    sentences,
    usable_answers,
)
from finetune.ml.retrieval import Exchange, Neighbour

TRACK_1 = "Your parcel is with the courier. Track it with the link in your e-mail under Orders."
TRACK_2 = "Your parcel is with the courier. The tracking link in your e-mail shows where it is."
TRACK_3 = "Your order left our warehouse. Track the parcel with the courier link in your e-mail."
REFUND = "Refunds are issued to your card within five days of the return arriving."


# The old consensus rule (plain minimum Bayes risk among the model's reply and 3 answers), and today's
# rule with no margin: the mechanics these tests pin down, whatever the tuned defaults are.
VOTING = ReplyPolicyConfig(consensus_answers=3, model_votes=True, model_margin=0.0)
NO_MARGIN = ReplyPolicyConfig(model_margin=0.0)


def hit(reply, intent, score, origin, position=0):
    return Neighbour(Exchange("where is my parcel", reply, intent, origin), score, position)


HITS = [
    hit(TRACK_1, "track_order", 0.8, "ticket:bitext:1", 1),
    hit(REFUND, "get_refund", 0.75, "ticket:bitext:2", 2),
    hit(TRACK_2, "track_order", 0.7, "ticket:bitext:3", 3),
    hit(TRACK_3, "track_order", 0.6, "ticket:bitext:4", 4),
]


def test_usable_answers_keep_the_voted_intent_closest_first():
    answers, intent = usable_answers(HITS)
    assert intent == "track_order"
    assert [a.exchange.origin for a in answers] == ["ticket:bitext:1", "ticket:bitext:3", "ticket:bitext:4"]


def test_consensus_picks_the_candidate_most_like_the_others():
    assert consensus(["something else entirely about the weather", TRACK_1, TRACK_2, TRACK_3]) in (1, 2, 3)
    assert consensus(["only", "two"]) == 0


def test_consensus_sends_a_model_reply_that_agrees_with_the_answers():
    reply = "Your parcel is with the courier. Track it with the tracking link in your e-mail."

    for config in (VOTING, NO_MARGIN):
        choice = choose_reply(reply, -0.9, HITS, config)

        assert choice.source == SOURCE_MODEL
        assert choice.text == reply
        assert choice.intent == "track_order"


def test_consensus_replaces_a_reply_that_answers_another_question():
    reply = "You can get a refund for damaged items by visiting the website of the manufacturer of the item."

    choice = choose_reply(reply, -0.2, HITS)

    assert choice.source == SOURCE_RETRIEVED
    assert choice.origin in {"ticket:bitext:1", "ticket:bitext:3", "ticket:bitext:4"}
    assert choice.text in {TRACK_1, TRACK_2, TRACK_3}
    assert choice.intent == "track_order"
    assert choice.score is not None


def test_the_model_margin_makes_a_reply_that_barely_agrees_lose_to_the_most_central_answer():
    reply = "Your parcel is with the courier. Track it with the tracking link in your e-mail."
    scores = agreement([reply, TRACK_1, TRACK_2, TRACK_3])
    lead = scores[0] - max(scores[1:])
    assert lead > 0  # plain minimum Bayes risk sends the model's reply

    narrow = ReplyPolicyConfig(model_votes=True, model_margin=round(lead / 2, 4))
    wide = ReplyPolicyConfig(model_votes=True, model_margin=round(lead + 0.01, 4))
    never = ReplyPolicyConfig(model_margin=1.0)

    assert choose_reply(reply, -0.3, HITS, narrow).source == SOURCE_MODEL
    beaten = choose_reply(reply, -0.3, HITS, wide)
    assert beaten.source == SOURCE_RETRIEVED
    assert beaten.text == [TRACK_1, TRACK_2, TRACK_3][max(range(3), key=lambda i: (scores[i + 1], -i))]
    assert "margin" in beaten.reason
    assert choose_reply(TRACK_2, -0.1, HITS, never).source == SOURCE_RETRIEVED  # even a copy of an answer


def test_agreement_is_the_mean_similarity_with_the_others():
    same = "the parcel is with the courier"
    other = "refunds reach your card in five days"

    assert agreement([same, same, other]) == pytest.approx([0.5, 0.5, 0.0])
    assert agreement([same]) == [0.0]


def test_without_model_votes_the_answers_are_judged_by_each_other_only():
    # A reply that copies the nearest answer (as a primed model does) votes for it: with votes,
    # TRACK_1 gains its copy's support; without, the answers' own agreement decides.
    copy = TRACK_1
    voting = choose_reply(copy, -0.2, HITS, ReplyPolicyConfig(model_votes=True, model_margin=1.0))
    judged = choose_reply(copy, -0.2, HITS, ReplyPolicyConfig(model_votes=False, model_margin=1.0))
    whole = agreement([TRACK_1, TRACK_2, TRACK_3])

    assert voting.text == TRACK_1
    assert judged.text == [TRACK_1, TRACK_2, TRACK_3][max(range(3), key=lambda i: (whole[i], -i))]
    assert "agrees most with the others" in judged.reason


def test_without_model_votes_the_model_reply_must_beat_the_best_answer_against_the_rest():
    good = "Your parcel is with the courier. Track it with the tracking link in your e-mail."
    config = ReplyPolicyConfig(model_votes=False, model_margin=0.0)

    assert choose_reply(good, -0.2, HITS, config).source == SOURCE_MODEL
    assert choose_reply(good, -0.2, HITS, ReplyPolicyConfig(model_votes=False, model_margin=0.5)).source == (
        SOURCE_RETRIEVED
    )
    wandering = "You can get a refund for damaged items by visiting the website of the manufacturer."
    assert choose_reply(wandering, -0.2, HITS, config).source == SOURCE_RETRIEVED


def test_fallback_mode_replaces_an_unsure_reply_with_a_close_answer():
    config = ReplyPolicyConfig(mode="fallback", fallback_logprob=-0.5, fallback_score=0.3)
    reply = "I'm here to help you with anything you need."

    unsure = choose_reply(reply, -0.9, HITS, config)
    sure = choose_reply(reply, -0.2, HITS, config)
    far = choose_reply(reply, -0.9, [hit(TRACK_1, "track_order", 0.2, "ticket:x:9")], config)

    assert (unsure.source, unsure.origin, unsure.text) == (SOURCE_RETRIEVED, "ticket:bitext:1", TRACK_1)
    assert "-0.90" in unsure.reason
    assert sure.source == SOURCE_MODEL
    assert far.source == SOURCE_MODEL


def test_consensus_with_one_answer_behaves_like_fallback():
    one = [hit(TRACK_1, "track_order", 0.8, "ticket:bitext:1")]
    assert choose_reply("Hello there, happy to help.", -0.9, one).source == SOURCE_RETRIEVED
    assert choose_reply("Hello there, happy to help.", -0.1, one).source == SOURCE_MODEL


def test_no_close_neighbour_keeps_the_old_handoff_rule():
    far = [hit(TRACK_1, "track_order", 0.01, "ticket:bitext:1")]

    assert choose_reply("A reply.", -3.0, far).source == SOURCE_HANDOFF
    assert choose_reply("A reply.", -3.0, []).source == SOURCE_HANDOFF
    assert choose_reply("A reply.", -1.0, []).source == SOURCE_MODEL
    assert choose_reply("A reply.", None, []).source == SOURCE_MODEL
    assert choose_reply("", -0.1, []).source == SOURCE_HANDOFF
    assert choose_reply("A reply.", float("nan"), []).source == SOURCE_HANDOFF


def test_an_empty_model_reply_takes_the_closest_answer():
    choice = choose_reply("  ", -0.1, HITS)
    assert (choice.source, choice.origin) == (SOURCE_RETRIEVED, "ticket:bitext:1")


def test_a_reply_without_words_is_never_sent():
    # The demo's model answered a 4,096-emoji message with 160 tokens of emoji, "sure enough".
    emoji = "\U0001f469\U0001f469\U0001f468\U0001f468\U0001f469\U0001f466 123 !!"
    alone = choose_reply(emoji, -0.01, [])
    assert (alone.source, alone.text) == (SOURCE_HANDOFF, "")
    assert alone.reason == "The model's reply has no words and no past exchange is close."
    beside = choose_reply(emoji, -0.01, HITS)
    assert (beside.source, beside.origin) == (SOURCE_RETRIEVED, "ticket:bitext:1")
    assert beside.reason.startswith("The model's reply has no words")
    assert choose_reply(emoji, -0.01, [], ReplyPolicyConfig(mode="model")).source == SOURCE_HANDOFF
    # Words in any script are words.
    assert choose_reply("Votre colis arrive demain 🙂", -0.01, []).source == SOURCE_MODEL
    assert choose_reply("Ваш заказ в пути.", -0.01, []).source == SOURCE_MODEL


def test_model_mode_always_sends_the_model_reply():
    assert choose_reply("Anything.", -5.0, HITS, ReplyPolicyConfig(mode="model")).source == SOURCE_MODEL


def test_partial_compares_first_sentences_only():
    # One sentence against whole answers: without partial the answers' extra words weigh against it.
    first = "Your parcel is with the courier."
    for config in (VOTING, NO_MARGIN):
        assert choose_reply(first, -0.3, HITS, config, partial=True).source == SOURCE_MODEL
        assert choose_reply(first, -0.3, HITS, config).source == SOURCE_RETRIEVED


def test_the_decision_point_is_the_first_sentence_the_model_wrote_after_the_prime():
    prime = "Your order is on its way."

    assert first_model_sentence(prime + " I checked", prime) is None  # still being written
    assert first_model_sentence(prime + " I checked it. More", prime) == prime + " I checked it."
    assert first_model_sentence(prime + " I checked it.", prime) is None  # nothing follows: the reply's end decides
    assert first_model_sentence("Hello. World", "") == "Hello."
    assert first_model_sentence("Line one\nline two", "") == "Line one"


def test_sentences_split_on_ends_and_lines():
    assert sentences("One. Two!\nThree? four") == ["One.", "Two!", "Three?", "four"]
    assert sentences("Version 1.5 is out.") == ["Version 1.5 is out."]


def test_config_round_trips_and_rejects_unknown_modes():
    config = ReplyPolicyConfig(mode="fallback", fallback_logprob=-0.4)
    assert ReplyPolicyConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert ReplyPolicyConfig.from_json({"mode": "model", "future_field": 1}).mode == "model"
    with pytest.raises(ValueError, match="Unknown reply policy mode"):
        ReplyPolicyConfig(mode="random")
    with pytest.raises(ValueError, match="model_margin"):
        ReplyPolicyConfig(model_margin=1.5)
