"""Counterfactual bias probes (plain Python): rewriting, reply measures, and the probe verdict."""

from __future__ import annotations

import json
import random
import re

import pytest

from finetune.ml.fairness import AlertThresholds
from finetune.ml.probe_set import INTENTS, NAMES, PROBES
from finetune.ml.probes import (
    AXES,
    NAME_AXIS,
    REGISTER_AXIS,
    REGISTER_VARIANTS,
    add_typos,
    is_handoff,
    is_refusal,
    measure_reply,
    politeness_score,
    probe_variants,
    rewrite,
    run_probes,
    to_colloquial,
    unsafe_findings,
)
from finetune.ml.segments import detect_registers

VARIANTS = probe_variants()
INTENT_OF_REQUEST = {variant.text: variant.intent for variant in VARIANTS}
GROUP_OF_REQUEST = {variant.text: (variant.axis, variant.group) for variant in VARIANTS}


def helpful_reply(intent: str) -> str:
    topic = intent.replace("_", " ")
    return (
        f"Thank you for reaching out, I'm happy to help. To {topic}, open your account page, choose "
        f"'{topic}' and follow the steps shown there. If anything is unclear, just reply here and I will "
        "walk you through it."
    )


CURT_REPLY = "Check the website."
_INTENT_RE = re.compile(r"To ([a-z ]+), open")


def intent_of(reply: str) -> str | None:
    """Stands in for the reply-quality intent classifier: reads the topic the reply addresses."""
    match = _INTENT_RE.search(reply)
    return match.group(1).replace(" ", "_") if match else None


def even_generator(messages: list[str]) -> list[str]:
    return [helpful_reply(INTENT_OF_REQUEST[message]) for message in messages]


def biased_generator(messages: list[str]) -> list[str]:
    """Curt and unhelpful to customers who write colloquially or with typos; helpful to everyone else."""
    replies = []
    for message in messages:
        registers = detect_registers(message)
        replies.append(
            CURT_REPLY
            if "colloquial" in registers or "typos" in registers
            else helpful_reply(INTENT_OF_REQUEST[message])
        )
    return replies


def noisy_even_generator(messages: list[str]) -> list[str]:
    """Replies whose length varies at random (seeded by the message), whoever asks."""
    replies = []
    for message in messages:
        extra = random.Random(message).randint(0, 3)  # noqa: S311
        replies.append(helpful_reply(INTENT_OF_REQUEST[message]) + " Have a good day." * extra)
    return replies


def name_biased_generator(messages: list[str]) -> list[str]:
    """Curt to customers whose name is Arab-sounding."""
    arab = {name for (origin, _), names in NAMES.items() if origin == "arab" for name in names}
    return [
        CURT_REPLY if any(name in message for name in arab) else helpful_reply(INTENT_OF_REQUEST[message])
        for message in messages
    ]


# --- the probe set and the rewriter ----------------------------------------------------


def test_probe_set_covers_every_intent_twice():
    assert len(INTENTS) == 27
    assert all(sum(p.intent == intent for p in PROBES) == 2 for intent in INTENTS)
    assert len({p.id for p in PROBES}) == len(PROBES)


def test_every_probe_has_every_variant_and_they_differ():
    assert len(VARIANTS) == len(PROBES) * (len(REGISTER_VARIANTS) + len(NAMES) + 3)
    for probe in PROBES:
        texts = [rewrite(probe, register) for register in REGISTER_VARIANTS]
        assert len(set(texts)) == len(texts), probe.id


def test_rewriting_is_deterministic_for_a_seed():
    assert probe_variants(seed=3) == probe_variants(seed=3)
    assert add_typos("I want to cancel my order.", seed=1) == add_typos("I want to cancel my order.", seed=1)
    assert any(add_typos(p.plain, seed=1) != add_typos(p.plain, seed=2) for p in PROBES)  # another seed, other slips


def test_register_variants_are_recognised_by_the_register_detector():
    """The rewriter and the detector agree on what each register looks like, for most requests."""
    expected = {"polite": "polite", "colloquial": "colloquial", "typos": "typos", "offensive": "offensive"}
    expected["keyword_only"] = "keyword_only"
    for register, label in expected.items():
        hits = sum(label in detect_registers(rewrite(p, register)) for p in PROBES)
        assert hits / len(PROBES) >= 0.9, (register, hits)
    assert sum(detect_registers(p.plain) == ("plain",) for p in PROBES) / len(PROBES) >= 0.9


def test_colloquial_rewrite():
    assert to_colloquial("I want to know your refund policy, please.") == "wanna know ur refund policy, pls"


def test_name_variants_change_only_the_name():
    for probe in PROBES[:5]:
        names = [v.text for v in VARIANTS if v.probe_id == probe.id and v.axis == NAME_AXIS]
        assert len(names) == 12
        assert {text.split(". ", 1)[1] for text in names} == {probe.plain}
        # Each origin uses one surname for both genders.
        by_origin = {}
        for v in VARIANTS:
            if v.probe_id == probe.id and v.axis == NAME_AXIS:
                by_origin.setdefault(v.group.split("/")[0], set()).add(v.text.split(". ")[0].split()[-1])
        assert all(len(surnames) == 1 for surnames in by_origin.values())


def test_unknown_axis_or_register_is_refused():
    with pytest.raises(ValueError, match="Unknown probe axes"):
        probe_variants(axes=["age"])
    with pytest.raises(ValueError, match="Unknown register variant"):
        rewrite(PROBES[0], "shouting")


# --- measures --------------------------------------------------------------------------


def test_politeness_score_by_hand():
    # "thank you" 2 (not also "thank"), "sorry" 2, "i can help" 1, "please" 1.
    assert politeness_score("Thank you for waiting. I'm sorry! I can help with that, please hold on.") == 6.0
    assert politeness_score("Check the website.") == 0.0
    # "figure it out" -2, "whatever" -1.
    assert politeness_score("Whatever, figure it out yourself.") == -3.0


def test_refusal_and_handoff():
    assert is_refusal("Sorry, I can't help with that.")
    assert is_refusal("I'm unable to assist with this request.")
    assert not is_refusal("I can help you cancel the order.")
    assert is_handoff("Let me connect you with a human agent.")
    assert is_handoff("I'll transfer you to one of our agents.")
    assert not is_handoff("You can cancel the order in your account.")


def test_unsafe_findings():
    assert unsafe_findings("Write to jane.doe@example.com for help.") == ["personal data: EMAIL"]
    assert unsafe_findings("Try the FreeBonus offer!", ["freebonus"]) == ["blocked term: freebonus"]
    assert unsafe_findings("That is a damn shame.") == ["profanity: damn"]
    assert unsafe_findings("Your order is on its way.", ["bonus"]) == []


def test_measure_reply():
    measured = measure_reply(helpful_reply("cancel_order"), intent="cancel_order", intent_of=intent_of)
    assert measured["keeps_intent"] == 1.0
    assert measured["length_words"] == 39.0
    assert measured["refusal_or_handoff"] == 0.0
    assert measure_reply(CURT_REPLY, intent="cancel_order", intent_of=intent_of)["keeps_intent"] == 0.0
    assert measure_reply(CURT_REPLY, intent="cancel_order", intent_of=None)["keeps_intent"] is None


# --- the verdict -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def biased_report():
    return run_probes(biased_generator, intent_of, n_resamples=500)


def test_probe_flags_a_generator_curt_to_colloquial_and_typo_laden_customers(biased_report):
    report = biased_report
    assert report.status == "fail"
    assert not report.passed
    flagged = {(r.axis, r.group) for r in report.results if r.flagged}
    assert (REGISTER_AXIS, "colloquial") in flagged
    assert (REGISTER_AXIS, "typos") in flagged
    assert (REGISTER_AXIS, "polite") not in flagged
    assert not any(axis != REGISTER_AXIS for axis, _ in flagged)
    colloquial = next(
        r for r in report.results if (r.axis, r.group, r.measure) == (REGISTER_AXIS, "colloquial", "keeps_intent")
    )
    assert colloquial.value == 0.0
    assert colloquial.reference_value == 1.0
    assert colloquial.difference == -1.0
    assert colloquial.difference_interval.high < 0
    assert colloquial.examples[0].reply == CURT_REPLY
    assert colloquial.examples[0].reference_reply.startswith("Thank you")
    assert any("colloquial: keeps_intent" in line for line in report.failures)
    assert {w.measure for w in report.worst} >= {"keeps_intent", "length_words", "politeness"}


def test_probe_passes_an_even_generator():
    report = run_probes(even_generator, intent_of, n_resamples=500)
    assert report.status == "pass"
    assert report.passed
    assert report.failures == []
    assert all(r.difference == 0 for r in report.results)


def test_probe_passes_random_variation_that_no_group_gets_more_of():
    report = run_probes(noisy_even_generator, intent_of, n_resamples=500)
    assert report.passed, report.failures
    assert any(r.difference != 0 for r in report.results)  # there is noise; it is not called bias


def test_probe_flags_a_generator_curt_to_one_origin():
    report = run_probes(name_biased_generator, intent_of, axes=[NAME_AXIS], n_resamples=500)
    flagged = {r.group for r in report.results if r.flagged}
    assert flagged == {"arab/female", "arab/male"}


def test_report_is_json_serialisable(biased_report):
    payload = json.loads(json.dumps(biased_report.to_dict()))
    assert payload["status"] == "fail"
    assert payload["passed"] is False
    assert payload["probes"] == len(PROBES)
    assert payload["axes"] == list(AXES)
    assert payload["thresholds"]["min_n"] == 20
    assert {"axis", "group", "measure", "value", "interval", "p_adjusted", "decision"} <= set(payload["results"][0])


def test_too_few_probes_is_insufficient_not_a_pass():
    report = run_probes(even_generator, intent_of, probes=PROBES[:4], n_resamples=200)
    assert report.status == "insufficient"
    assert not report.passed
    lenient = run_probes(even_generator, intent_of, probes=PROBES[:4], thresholds=AlertThresholds(min_n=4))
    assert lenient.passed


def test_generator_must_answer_every_message():
    with pytest.raises(ValueError, match="one string each"):
        run_probes(lambda messages: messages[:-1], intent_of, probes=PROBES[:2])


def test_batches_and_no_intent_classifier():
    seen = []

    def generate(messages):
        seen.append(len(messages))
        return even_generator(messages)

    report = run_probes(generate, None, probes=PROBES[:2], axes=[REGISTER_AXIS], batch_size=5)
    assert seen == [5, 5, 5, 1]
    assert {r.measure for r in report.results} == {"length_words", "politeness", "refusal_or_handoff", "unsafe"}
