"""The reply intent classifier: trained on replies, saved without pickle, loaded identically."""

from __future__ import annotations

import pytest

from finetune.ml.intent import IntentClassifier, IntentClassifierError

REPLIES = {
    "get_refund": [
        "Your refund has been issued and reaches your card in five days.",
        "I have started the refund; the money is back on your card within a week.",
        "The refund for the returned item is on its way to your card.",
    ],
    "track_order": [
        "Your parcel is with the courier; track it with the link in your e-mail.",
        "The tracking page shows your parcel arrives tomorrow.",
        "Your order left our warehouse; the courier's tracking link has the details.",
    ],
    "recover_password": [
        "Use Forgot password on the sign-in page to get a reset link.",
        "I have sent a password reset link to your e-mail address.",
        "Reset your password from the sign-in page with Forgot password.",
    ],
}


@pytest.fixture(scope="module")
def classifier() -> IntentClassifier:
    replies = [r for rs in REPLIES.values() for r in rs]
    intents = [i for i, rs in REPLIES.items() for _ in rs]
    return IntentClassifier.train(replies, intents)


def test_predicts_the_intent_a_reply_answers(classifier):
    assert classifier.predict(["Your refund is on its way back to your card."]) == ["get_refund"]
    assert classifier.predict(["Check the courier's tracking link for your parcel."]) == ["track_order"]


def test_accuracy_is_the_share_classified_as_their_intent(classifier):
    replies = ["The refund reaches your card soon.", "Use Forgot password to reset it.", "Your refund is issued."]

    assert classifier.accuracy(replies, ["get_refund", "recover_password", "track_order"]) == pytest.approx(2 / 3)
    assert classifier.accuracy(replies, ["", "", ""]) is None


def test_saved_classifier_predicts_the_same(classifier, tmp_path):
    classifier.save(tmp_path / "intent")

    loaded = IntentClassifier.load(tmp_path / "intent")

    probe = ["Your parcel arrives tomorrow.", "A reset link is in your e-mail.", "Refund issued to your card."]
    assert loaded.predict(probe) == classifier.predict(probe)
    assert loaded.intents == classifier.intents


def test_needs_two_intents_and_a_saved_directory(tmp_path):
    with pytest.raises(IntentClassifierError, match="at least two intents"):
        IntentClassifier.train(["Your refund is issued.", "Refund sent."], ["get_refund", "get_refund"])
    with pytest.raises(IntentClassifierError, match="train one first"):
        IntentClassifier.load(tmp_path / "missing")
