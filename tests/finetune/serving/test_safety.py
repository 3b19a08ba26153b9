"""The safety filter: personal data and blocked terms never leave the server, streamed or not."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.serving.batched import BatchedEngine
from finetune.serving.placeholders import fill_placeholders
from finetune.serving.repetition import cut_repetition
from finetune.serving.safety import (
    BLOCKED_MASK,
    Masker,
    SafeEngine,
    StreamFilter,
    blocked_terms_masker,
    mask_text,
    number_tail,
    parse_blocked_terms,
    pii_masker,
    register_masker,
    reply_maskers,
    term_prefix_tail,
    unregister_masker,
)
from tests.finetune.serving.engine_models import collect, conversation, load, request, tiny_llama_dir

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
SECRETS = (EMAIL, PHONE, CARD)


def stream_through(flt: StreamFilter, text: str, sizes: list[int]) -> list[str]:
    """Feed ``text`` in chunks of the given sizes (cycled); returns every non-empty output."""
    out, i, k = [], 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)]
        piece = flt.push(text[i : i + size])
        if piece:
            out.append(piece)
        i, k = i + size, k + 1
    tail = flt.flush()
    if tail:
        out.append(tail)
    return out


def test_personal_data_is_masked():
    masked = mask_text(f"Write to {EMAIL}, call {PHONE} or pay with {CARD}.", [pii_masker()])
    assert masked == "Write to {{EMAIL}}, call {{PHONE}} or pay with {{CARD}}."


def test_ordinary_text_and_short_numbers_pass_unchanged():
    text = "Your order 42 ships in 3 days; refunds take 5 to 7 business days."
    assert mask_text(text, reply_maskers()) == text


def test_blocked_terms_are_masked_as_whole_words_in_any_case_and_spacing():
    masker = blocked_terms_masker(parse_blocked_terms("ass\n\n  Free Money \n"))
    text = "Free money! We assist the ASS with free\n  money, and glass."
    assert masker.mask(text) == f"{BLOCKED_MASK}! We assist the {BLOCKED_MASK} with {BLOCKED_MASK}, and glass."
    assert blocked_terms_masker(parse_blocked_terms("\n  \n")) is None


def test_blocked_terms_in_scripts_without_spaces_are_masked_inside_words():
    masker = blocked_terms_masker(["免费", "ガチャ", "free 钱"])
    text = "这是免费的！ガチャガチャは禁止。Free 钱到账，freedom 不是。"
    assert (
        masker.mask(text)
        == f"这是{BLOCKED_MASK}的！{BLOCKED_MASK}{BLOCKED_MASK}は禁止。{BLOCKED_MASK}到账，freedom 不是。"
    )
    hold = term_prefix_tail(["免费", "free 钱"])
    assert hold("这是免") == 1  # the start of a term inside a word is held
    assert hold("我们 fre") == 3
    assert hold("a fre") == 3
    assert hold("afre") == 0  # a Latin edge still needs a word start


def test_hold_back_rules():
    assert number_tail("call 555 123 ") == len("555 123 ")
    assert number_tail("call me later ") == 0
    hold = term_prefix_tail(["free money", "ass"])
    assert hold("it is Free   mo") == len("Free   mo")
    assert hold("the as") == 2
    assert hold("a glass") == 0  # not at a word start, so never a match


@pytest.mark.parametrize("sizes", [[1], [2], [3], [5, 1, 7], [100]])
def test_streamed_deltas_equal_the_filtered_reply_and_never_leak(sizes):
    maskers = reply_maskers(["free money"])
    text = f"Hi, mail {EMAIL} or call {PHONE} today. Card {CARD} ok. Free  money!\nBye {EMAIL}"
    flt = StreamFilter(maskers)
    out = stream_through(flt, text, sizes)
    assert "".join(out) == flt.text == mask_text(text, maskers)
    sent = ""
    for piece in out:
        sent += piece
        assert not any(secret[:6] in sent for secret in SECRETS)  # not even the start of one
    assert "money" not in sent


_WORDS = st.sampled_from(
    ["Hello", "order", "the", "Free", "money", "free money", "assist", "ass", "42", "3-5", "(555)", "day.", "x@y"]
)
_PIECES = st.one_of(_WORDS, st.sampled_from(SECRETS))


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(_PIECES, min_size=1, max_size=25),
    separators=st.lists(st.sampled_from([" ", "  ", "\n", ", ", ". "]), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6),
)
def test_streaming_is_the_same_as_masking_the_whole_reply(pieces, separators, sizes):
    check_streamed_equals_whole(pieces, separators, sizes, ["free money", "ass"], SECRETS)


def check_streamed_equals_whole(pieces, separators, sizes, blocked_terms, secrets) -> None:
    """Join ``pieces`` with ``separators``, stream it in ``sizes`` chunks: same as masking it whole, no secret out."""
    maskers = reply_maskers(blocked_terms)
    text = "".join(piece + separators[i % len(separators)] for i, piece in enumerate(pieces))
    flt = StreamFilter(maskers)
    out = "".join(stream_through(flt, text, sizes))
    assert out == flt.text == mask_text(text, maskers)
    for secret in secrets:
        assert secret not in out


SECRET_URL = "https://example.com/reset?token=8f3b2c1d9e7a6b5c4d3e2f1a"


def test_a_reply_without_spaces_streams_clause_by_clause():
    """Chinese has no spaces: its punctuation ends segments, so the reply does not wait for the end."""
    maskers = reply_maskers()
    text = "您好，您的订单已经发货了。预计3天内送达，请耐心等待。如有问题，请联系我们！"
    flt = StreamFilter(maskers)
    out = stream_through(flt, text, [1])
    assert "".join(out) == flt.text == text
    assert out[0] == "您好，"
    assert len(out) >= 5


def test_personal_data_next_to_cjk_punctuation_never_leaks():
    maskers = reply_maskers()
    text = f"电话：{PHONE}，邮箱：{EMAIL}。重置链接：{SECRET_URL}。谢谢 再见。"
    flt = StreamFilter(maskers)
    out = stream_through(flt, text, [1])
    assert "".join(out) == flt.text == mask_text(text, maskers)
    sent = ""
    for piece in out:
        sent += piece
        assert not any(secret[:4] in sent for secret in (*SECRETS, SECRET_URL))
    assert "{{PHONE}}" in sent
    assert "{{EMAIL}}" in sent
    assert "token=" not in sent


def test_a_url_is_never_split_at_cjk_punctuation():
    """The URL pattern runs to the next whitespace: a secret after a "。" inside it is still masked."""
    maskers = reply_maskers()
    text = "链接：https://example.com/reset。?token=8f3b2c1d9e7a6b5c4d3e2f1a 谢谢"
    flt = StreamFilter(maskers)
    out = "".join(stream_through(flt, text, [1]))
    assert out == mask_text(text, maskers)
    assert "8f3b" not in out


def test_number_runs_end_at_cjk_punctuation():
    # A clause with a digit waits for the next clause (it might be "3 …" of a number)…
    assert number_tail("预计3天内送达，请") == len("预计3天内送达，请")
    # …but not for the rest of the reply.
    assert number_tail("预计3天内送达，请耐心等待。如") == 0
    assert number_tail("电话：+44 20") == len("+44 20")


_CJK_WORDS = st.sampled_from(
    ["您好", "订单", "已发货", "3天", "请", "免费", "是免", "费的", "Free", "money", "42", "(555)", "x@y"]
)
_CJK_SEPARATORS = ["，", "。", "、", "！", "：", " ", "。 ", "（", "）", ""]
_CJK_PIECES = st.one_of(_CJK_WORDS, st.sampled_from((*SECRETS, SECRET_URL)))


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(_CJK_PIECES, min_size=1, max_size=25),
    separators=st.lists(st.sampled_from(_CJK_SEPARATORS), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6),
)
def test_streaming_cjk_is_the_same_as_masking_the_whole_reply(pieces, separators, sizes):
    check_streamed_equals_whole(pieces, separators, sizes, ["free money", "免费"], (*SECRETS, SECRET_URL))


def test_registered_maskers_apply_to_every_reply():
    masker = Masker(name="test-acme", mask=lambda t: re.sub(r"\bAcme\b", "[company]", t), hold_back=lambda t: 0)
    register_masker(masker)
    try:
        assert "test-acme" in [m.name for m in reply_maskers()]
        assert mask_text("Acme says hi", reply_maskers()) == "[company] says hi"
    finally:
        unregister_masker("test-acme")
    assert "test-acme" not in [m.name for m in reply_maskers()]


async def test_safe_engine_masks_a_real_engines_stream():
    loaded = load(tiny_llama_dir())  # its random weights produce words ("agent", "reset")
    messages = conversation("Where is my order?")
    inner = BatchedEngine(loaded)
    try:
        _, plain = await collect(inner, request("p", messages, max_new_tokens=40))
        # Block a word the model is known to produce for this prompt.
        word = max(re.findall(r"(?<!\w)[a-z]{4,}(?!\w)", plain.text), key=len)
        safe = SafeEngine(inner, maskers_for=lambda req: _async(reply_maskers([word])))
        deltas, done = await collect(safe, request("s", messages, max_new_tokens=40))
    finally:
        inner.close(timeout=10)
    assert re.search(rf"(?<!\w){re.escape(word)}(?!\w)", plain.text, re.IGNORECASE)
    # The whole pipeline: the repetition cut, then the masks, then the slot filler.
    assert done.text == fill_placeholders(mask_text(cut_repetition(plain.text).text, reply_maskers([word])))
    assert BLOCKED_MASK in done.text
    assert not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", "".join(deltas), re.IGNORECASE)
    assert (done.token_count, done.finish_reason) == (plain.token_count, plain.finish_reason)


async def _async(value):
    return value


def test_ibans_and_secret_urls_are_held_back_too():
    masker = pii_masker()
    iban, url = "DE89 3704 0044 0532 0130 00", "https://acme.example/reset?token=abc123def456ghi789"
    text = f"Pay to {iban} and open {url} now. Thanks!"
    for sizes in ([1], [2], [3, 1]):
        flt = StreamFilter([masker])
        out = stream_through(flt, text, sizes)
        assert "".join(out) == flt.text == mask_text(text, [masker])
        assert "{{IBAN}}" in flt.text
        assert "{{URL}}" in flt.text
        sent = ""
        for piece in out:
            sent += piece
            assert "DE89" not in sent
            assert "token=" not in sent
