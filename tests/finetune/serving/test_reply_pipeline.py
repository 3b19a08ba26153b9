"""The reply pipeline: repetition controls in both engines, the repetition cut, slots filled while streaming.

Order (``finetune.serving.safety``): engine -> RepetitionGuard -> reply policy ->
StreamFilter (personal data) -> PlaceholderFiller. The looping and placeholder models
are tiny GPT-2s overfit on one reply (``engine_models``), so they really loop and really
write ``{{…}}`` slots, token by token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from dataclasses import dataclass

import pytest

from finetune.ml.decoding import DecodingConfig
from finetune.ml.reply_policy import choose_reply
from finetune.serving.batched import BatchedEngine
from finetune.serving.interface import GenerationDone, TokenDelta
from finetune.serving.naive import NaiveEngine
from finetune.serving.placeholders import fill_placeholders
from finetune.serving.repetition import has_repetition
from finetune.serving.safety import ReplyPlan, SafeEngine, reply_maskers
from tests.finetune.serving.engine_models import (
    LOOP_SENTENCE,
    collect,
    conversation,
    load,
    looping_gpt2_dir,
    placeholder_gpt2_dir,
    request,
)

FACTS = {"company_name": "Acme", "support_phone": "+44 20 7946 0958", "website_url": "https://acme.example"}


def _without_controls(tmp_path):
    """The looping model as a version whose train_config.json turns the repetition controls off."""
    out = tmp_path / "looping-no-controls"
    shutil.copytree(looping_gpt2_dir(), out)
    (out / "train_config.json").write_text(json.dumps({"decoding": {"no_repeat_ngram_size": 0}}))
    return out


def _engines(loaded):
    return {"naive": NaiveEngine(loaded), "batched": BatchedEngine(loaded, max_batch_size=4)}


def _close(engines):
    for engine in engines.values():
        if hasattr(engine, "close"):
            engine.close(timeout=10)


def _token_ngrams_repeat(tokenizer, text: str, n: int) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_the_version_decoding_config_is_read_from_train_config(tmp_path):
    assert load(looping_gpt2_dir()).decoding == DecodingConfig()  # absent: the default controls
    assert load(_without_controls(tmp_path)).decoding.no_repeat_ngram_size == 0


@pytest.mark.parametrize("kind", ["naive", "batched"])
async def test_repetition_controls_act_in_both_engines(tmp_path, kind):
    messages = conversation("Where is my order?")
    controlled, free = load(looping_gpt2_dir()), load(_without_controls(tmp_path))
    engines = {"controlled": _engines(controlled)[kind], "free": _engines(free)[kind]}
    try:
        _, with_controls = await collect(engines["controlled"], request("a", messages, max_new_tokens=60))
        _, without = await collect(engines["free"], request("b", messages, max_new_tokens=60))
    finally:
        _close(engines)
    # The same model loops without the controls, and says no 6-token run twice with them.
    assert without.text.count(LOOP_SENTENCE) >= 3
    assert _token_ngrams_repeat(controlled.tokenizer, without.text, 6)
    assert not _token_ngrams_repeat(controlled.tokenizer, with_controls.text, 6)


async def test_both_engines_give_the_same_controlled_reply():
    loaded = load(looping_gpt2_dir())
    engines = _engines(loaded)
    try:
        _, naive = await collect(engines["naive"], request("n", conversation("Where is my order?"), max_new_tokens=60))
        _, batched = await collect(
            engines["batched"], request("b", conversation("Where is my order?"), max_new_tokens=60)
        )
    finally:
        _close(engines)
    assert (batched.text, batched.token_count, batched.finish_reason) == (
        naive.text,
        naive.token_count,
        naive.finish_reason,
    )
    assert batched.mean_logprob == pytest.approx(naive.mean_logprob, abs=1e-4)


@pytest.mark.parametrize("kind", ["naive", "batched"])
async def test_a_looping_reply_is_cut_at_the_repetition_and_marked(tmp_path, kind):
    loaded = load(_without_controls(tmp_path))
    engines = _engines(loaded)
    inner = engines[kind]
    try:
        _, raw = await collect(inner, request("raw", conversation("Where is my order?"), max_new_tokens=80))
        deltas, done = await collect(
            SafeEngine(inner), request("s", conversation("Where is my order?"), max_new_tokens=80)
        )
    finally:
        _close(engines)
    assert has_repetition(raw.text)
    assert raw.finish_reason == "length"
    assert done.text.strip() == LOOP_SENTENCE  # the first saying kept, the repeats gone
    assert done.cut_reason == "sentence"
    assert done.finish_reason == "stop"  # a finished reply, not a failure
    assert done.token_count < raw.token_count  # the engine was stopped at the cut, not run to its limit
    assert "".join(deltas) == done.text


@pytest.mark.parametrize("kind", ["naive", "batched"])
async def test_a_model_written_slot_is_filled_from_the_company_facts_while_streaming(kind):
    loaded = load(placeholder_gpt2_dir())
    engines = _engines(loaded)
    inner = engines[kind]

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), facts=FACTS)

    try:
        _, raw = await collect(inner, request("raw", conversation("Where is my order?"), max_new_tokens=40))
        deltas, done = await collect(
            SafeEngine(inner, plan_for=plan_for), request("s", conversation("Where is my order?"), max_new_tokens=40)
        )
    finally:
        _close(engines)
    assert "{{Customer Support Phone Number}}" in raw.text
    # The company's phone is put in after the personal-data masker, so it is not masked.
    assert FACTS["support_phone"] in done.text
    assert done.text.strip() == fill_placeholders(raw.text, FACTS, {}).strip()
    assert not any("{" in d or "}" in d for d in deltas)


# --- the pipeline on a scripted stream -----------------------------------------------------


class ScriptedEngine:
    """An engine that streams a fixed text in given pieces, with a confidence per piece; records cancels."""

    model_label = "v1"

    def __init__(self, pieces: list[str], mean_logprob: float = -0.1):
        self.pieces = pieces
        self.mean_logprob = mean_logprob
        self.cancelled: list[str] = []
        self.requests = []

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def stream(self, req):
        self.requests.append(req)
        sent = 0
        for piece in self.pieces:
            if req.request_id in self.cancelled:
                break
            await asyncio.sleep(0)
            sent += 1
            yield TokenDelta(piece, mean_logprob=self.mean_logprob)
        reason = "cancelled" if req.request_id in self.cancelled else "stop"
        yield GenerationDone(
            text="".join(self.pieces[:sent]),
            finish_reason=reason,
            token_count=sent,
            mean_logprob=self.mean_logprob,
            model_label="v1",
            first_token_ms=1,
            latency_ms=2,
        )


def chars(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
async def test_slots_split_across_any_token_boundary_are_filled_and_never_shown(size):
    text = (
        "Thank you for reaching out about your parcel today. I checked your order {{Order Number}} and it ships "
        "today, so it should reach you within two or three business days. If anything goes wrong, call "
        "{{Customer Support Phone Number}} or see [Website URL]. We are always happy to help you."
    )
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    messages = [*conversation("Where is order 12345678?")]

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), facts=FACTS)

    deltas, done = await collect(SafeEngine(ScriptedEngine(pieces), plan_for=plan_for), request("k", messages))
    assert done.text == (
        "Thank you for reaching out about your parcel today. I checked your order 12345678 and it ships "
        "today, so it should reach you within two or three business days. If anything goes wrong, call "
        "+44 20 7946 0958 or see https://acme.example. We are always happy to help you."
    )
    assert not any(mark in d for d in deltas for mark in ("{", "}", "["))
    assert len(deltas) > 2  # incremental, not one block at the end


FRENCH_SLOT_REPLY = (
    "Bonjour {{NAME}}, c'est fait : la commande {{ORDER_ID}} sera livrée à l'adresse {{ADDRESS}}. "
    "Suivez-la sur notre {{Website Name}} ou appelez {{Customer Support Phone Number}} si besoin."
)


@pytest.mark.parametrize("size", [1, 4])
async def test_a_french_conversation_gets_french_neutral_words(size):
    pieces = [FRENCH_SLOT_REPLY[i : i + size] for i in range(0, len(FRENCH_SLOT_REPLY), size)]
    french = conversation("Bonjour, je voudrais changer l'adresse de livraison de ma commande, s'il vous plaît.")

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), facts={"company_name": "Acme"})

    # No language on the request (a caller without stored labels): found from the customer's words.
    deltas, done = await collect(SafeEngine(ScriptedEngine(pieces), plan_for=plan_for), request("fr", french))

    expected = (
        "Bonjour, c'est fait : votre commande sera livrée à votre adresse. "
        "Suivez-la sur notre site web ou appelez notre service client par téléphone si besoin."
    )
    assert done.text == expected
    assert "".join(deltas) == expected
    assert len(deltas) > 2  # still streamed, not held to the end


async def test_the_requests_language_is_used_as_given_until_the_reply_itself_tells():
    # The label stored with the customer's message wins over the conversation's text (here:
    # too short to tell); once the reply's own text before a slot tells its language (20
    # letters), that decides: an English past answer to a question taken for German must not
    # get German words, nor a French reply English ones.
    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers())

    async def reply(text: str, language: str | None) -> str:
        req = request("c", conversation("12345678"))
        req = dataclasses.replace(req, language=language) if language else req
        _, done = await collect(SafeEngine(ScriptedEngine(chars(text)), plan_for=plan_for), req)
        return done.text

    short = "Voir {{Website Name}}."  # too short to tell: the conversation's language
    assert await reply(short, "fr") == "Voir notre site web."
    assert await reply(short, None) == "Voir our website."  # no label, nothing to tell: English
    # The reply tells: French words whatever the label, the customer's order number in both.
    for language in ("fr", None, "de"):
        text = await reply(FRENCH_SLOT_REPLY, language)
        assert "la commande 12345678 sera livrée à votre adresse. Suivez-la sur notre site web" in text
    english = "You can check the refund status on {{Website URL}} at any time."
    assert await reply(english, "de") == "You can check the refund status on our website at any time."


@dataclass(frozen=True)
class Choice:
    source: str
    text: str = ""
    reason: str = "test"
    origin: str = ""
    intent: str = ""
    score: float | None = None

    def to_json(self):
        return {"source": self.source, "reason": self.reason, "origin": self.origin, "score": self.score}


async def test_the_policy_decides_on_the_first_sentence_before_anything_is_shown():
    model_text = "I am not sure what you mean. Maybe try again later or something else entirely."
    seen = []

    def decide(text, mean_logprob, *, partial):
        seen.append((text, mean_logprob, partial))
        return Choice("retrieved", "Your order {{Order Number}} is on its way.", origin="ticket:bitext:7", score=0.8)

    engine = ScriptedEngine(chars(model_text), mean_logprob=-1.2)

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), facts=FACTS, decide=decide, grounding=[{"origin": "ticket:bitext:7"}])

    deltas, done = await collect(
        SafeEngine(engine, plan_for=plan_for), request("k", conversation("Where is order 4512?"))
    )
    assert seen == [("I am not sure what you mean.", -1.2, True)]
    assert done.text == "Your order 4512 is on its way."
    assert "not sure" not in "".join(deltas)  # the model's words were held, never shown
    assert (done.source, done.source_origin, done.finish_reason) == ("retrieved", "ticket:bitext:7", "stop")
    assert done.grounding == [{"origin": "ticket:bitext:7"}]
    assert engine.cancelled  # the model was stopped once the answer was chosen


async def test_when_the_policy_keeps_the_model_reply_it_streams_on():
    model_text = (
        "Thanks for asking. Your parcel left our warehouse yesterday and the courier says it arrives soon, most "
        "likely on Thursday morning. You will get an e-mail with the tracking link once it is out for delivery. "
        "Is there anything else I can do for you today?"
    )

    def decide(text, mean_logprob, *, partial):
        return Choice("model")

    engine = ScriptedEngine(chars(model_text))

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), decide=decide)

    deltas, done = await collect(SafeEngine(engine, plan_for=plan_for), request("k", conversation("Where is it?")))
    assert done.text == model_text
    assert (done.source, done.handoff, done.cut_reason) == ("model", False, "")
    assert len(deltas) > 2
    assert not engine.cancelled


async def test_a_handoff_choice_is_marked_on_the_reply():
    def decide(text, mean_logprob, *, partial):
        return Choice("handoff")

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), decide=decide)

    _, done = await collect(
        SafeEngine(ScriptedEngine(chars("Hmm. I do not know.")), plan_for=plan_for), request("k", conversation("?"))
    )
    assert done.handoff
    assert done.source == "model"


async def test_a_reply_without_words_that_the_policy_hands_off_is_never_shown():
    # The demo's model answered a 4,096-emoji message with emoji; the policy hands it off.
    def decide(text, mean_logprob, *, partial):
        return choose_reply(text, -0.01, [])

    async def plan_for(req):
        return ReplyPlan(maskers=reply_maskers(), decide=decide)

    emoji = "\U0001f469\U0001f469\U0001f468 \U0001f468\U0001f469\U0001f466 " * 20
    engine = ScriptedEngine(chars(emoji))
    deltas, done = await collect(SafeEngine(engine, plan_for=plan_for), request("k", conversation("\U0001f600" * 50)))
    assert (deltas, done.text) == ([], "")  # the service saves it as failed: "could not answer", and hands off
    assert done.handoff
    assert done.policy["reason"] == "The model's reply has no words and no past exchange is close."


@pytest.mark.parametrize("kind", ["naive", "batched"])
async def test_the_engines_decode_as_the_evaluation_does(kind):
    """The same prompt, model and repetition controls give the evaluation's reply and confidence."""
    from finetune.ml.prompting import render_prompt
    from finetune.ml.quality import generate_scored

    loaded = load(looping_gpt2_dir())
    messages = conversation("Where is my order?")
    evaluated = generate_scored(
        loaded.model,
        loaded.tokenizer,
        [render_prompt(messages, loaded.tokenizer)],
        max_new_tokens=60,
        batch_size=1,
        decoding=loaded.decoding,
    )[0]
    engines = _engines(loaded)
    try:
        _, served = await collect(engines[kind], request("e", messages, max_new_tokens=60))
    finally:
        _close(engines)
    assert served.text.strip() == evaluated["text"].strip()
    assert served.mean_logprob == pytest.approx(evaluated["mean_logprob"], abs=1e-3)
