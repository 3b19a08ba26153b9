"""The repetition cut: a reply ends where it starts repeating itself, also while streaming."""

from __future__ import annotations

import pytest

from finetune.serving.repetition import RepetitionGuard, cut_repetition, has_repetition

REFUND = "You can get a refund for damaged items by visiting our website."


def test_a_repeated_sentence_is_cut_and_marked():
    reply = f"I'm sorry to hear that. {REFUND} Please keep the receipt. {REFUND} {REFUND}"

    result = cut_repetition(reply)

    assert result.cut
    assert result.reason == "sentence"
    assert result.text == f"I'm sorry to hear that. {REFUND} Please keep the receipt."


def test_a_looping_phrase_is_cut_at_its_first_occurrence():
    reply = "Je voudrais changer le nom de l'adresse de l'adresse de l'adresse de l'adresse de l'adresse"

    result = cut_repetition(reply)

    assert result.cut
    assert result.reason == "loop"
    assert result.text == "Je voudrais changer le nom de l'adresse"


def test_a_paragraph_said_twice_is_cut():
    para = "Log in to your account, open the orders page and choose the order you want to change"
    result = cut_repetition(f"Sure. {para} and then press save, {para} again")

    assert result.cut
    assert result.reason == "ngram"
    assert "again" not in result.text


@pytest.mark.parametrize(
    "reply",
    [
        "1. Log in.\n2. Open Orders.\n3. Press Cancel.",  # list numbers and short steps are not repeats
        "Thank you! Thank you for your patience, we are on it.",
        "Visit our website or call us; our website lists our hours.",
    ],
)
def test_ordinary_replies_are_left_whole(reply):
    assert cut_repetition(reply).text == reply
    assert not has_repetition(reply)


def test_streaming_guard_stops_at_the_repeat_and_sends_the_same_text():
    reply = f"I'm sorry to hear that. {REFUND} Please keep the receipt. {REFUND} {REFUND}"
    guard = RepetitionGuard()
    sent = ""
    stopped_at = None
    for i in range(0, len(reply), 3):
        sent += guard.push(reply[i : i + 3])
        if guard.cut:
            stopped_at = i
            break
    sent += guard.finish()

    assert guard.cut
    assert guard.reason == "sentence"
    assert sent == cut_repetition(reply).text == guard.text
    # It stopped as soon as the repeated sentence was complete, not at the end.
    assert stopped_at is not None
    assert stopped_at < len(reply) - len(REFUND)


def test_streaming_guard_passes_a_clean_reply_through():
    reply = "Your parcel left our warehouse today. Track it with the link in your e-mail."
    guard = RepetitionGuard()
    sent = "".join(guard.push(reply[i : i + 4]) for i in range(0, len(reply), 4)) + guard.finish()

    assert sent == reply
    assert not guard.cut


def _stream(reply: str, size: int) -> tuple[RepetitionGuard, list[str]]:
    guard = RepetitionGuard()
    pieces = [guard.push(reply[i : i + size]) for i in range(0, len(reply), size)]
    pieces.append(guard.finish())
    return guard, [p for p in pieces if p]


def test_the_guard_streams_word_by_word_while_nothing_repeats():
    reply = "Your parcel left our warehouse today and should reach you within two or three business days."
    guard, pieces = _stream(reply, 3)
    assert "".join(pieces) == reply
    assert len(pieces) >= 10  # not held until the sentence or the reply ended


@pytest.mark.parametrize("size", [1, 2, 5])
def test_a_loop_or_a_paragraph_said_again_is_never_shown(size):
    loop = "Je voudrais changer le nom de l'adresse de l'adresse de l'adresse de l'adresse de l'adresse"
    guard, pieces = _stream(loop, size)
    shown = "".join(pieces)
    assert guard.cut
    assert guard.reason == "loop"
    assert "de l'adresse de l'adresse" not in shown
    assert shown == "Je voudrais changer le nom de l'adresse"

    paragraph = "You can return any item within thirty days of delivery for a full refund to your card"
    guard, pieces = _stream(f"Thanks for asking. {paragraph}, and {paragraph} again.", size)
    shown = "".join(pieces)
    assert guard.reason == "ngram"
    assert shown.count("within thirty days") == 1

    sentence = "Refunds are paid back within five business days."
    guard, pieces = _stream(f"I am sorry. {sentence} Keep the receipt. {sentence}", size)
    assert guard.reason == "sentence"
    assert "".join(pieces) == f"I am sorry. {sentence} Keep the receipt."
