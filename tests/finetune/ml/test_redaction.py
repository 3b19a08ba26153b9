"""Redaction of personal data: golden cases, validators, and hypothesis properties.

Properties: every generated e-mail address, phone number and Luhn-valid card number is
replaced by its placeholder wherever it sits in a text, and redaction is idempotent.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.ml.redaction import CustomerFields, find_pii, iban_valid, luhn_valid, redact

JANE = CustomerFields.from_values(
    name="Jane Doe",
    email="jane.doe@example.com",
    phone="+44 20 7946 0958",
    address="12 Baker Street, London NW1 6XE",
    identifiers=[{"type": "order", "value": "113542617735902"}, "ACC-7788", {"type": "invoice", "value": "#00108"}],
)

GOLDEN = [
    # (text, customer, expected redacted text)
    ("Mail me at jane@example.org please.", None, "Mail me at {{EMAIL}} please."),
    ("Write to jörg.müller@beispiel.de", None, "Write to {{EMAIL}}"),
    ("Call (555) 123-4567 or +1 202-555-0143.", None, "Call {{PHONE}} or {{PHONE}}."),
    ("My numbers: 555 123 4567 555 765 4321", None, "My numbers: {{PHONE}} {{PHONE}}"),
    ("UK office 020 7946 0018, tel. 0044 20 7946 0018", None, "UK office {{PHONE}}, tel. {{PHONE}}"),
    ("Card 4111 1111 1111 1111 expires 12/27", None, "Card {{CARD}} expires 12/27"),
    ("Amex 3782-822463-10005 and 5500005555555559", None, "Amex {{CARD}} and {{CARD}}"),
    ("Refund to GB82 WEST 1234 5698 7654 32 or DE89370400440532013000.", None, "Refund to {{IBAN}} or {{IBAN}}."),
    (
        "Reset: https://acme.example/reset?token=9f8e7d6c5b4a and https://acme.example/help/reset-password.",
        None,
        "Reset: {{URL}} and https://acme.example/help/reset-password.",
    ),
    ("Log in at https://admin:hunter2@acme.example/panel", None, "Log in at {{URL}}"),
    ("Order 370795561790 arrived", None, "Order {{NUMBER}} arrived"),
    # Chinese and Japanese run straight into numbers: no space, no \w boundary.
    ("请拨打138-1234-5678联系我们", None, "请拨打{{PHONE}}联系我们"),
    ("电话+86 138 1234 5678", None, "电话{{PHONE}}"),
    ("カード4111111111111111で払いました", None, "カード{{CARD}}で払いました"),
    ("您好https://acme.example/reset?token=9f8e7d6c5b4a谢谢", None, "您好{{URL}}"),
    ("访问www.acme.example/reset?token=9f8e7d6c5b4a 即可", None, "访问{{URL}} 即可"),
    ("Linkhttps://acme.example/reset?token=9f8e7d6c5b4a", None, "Link{{URL}}"),
    # An ASCII address written right up to Chinese, Japanese or Korean text: only the address goes.
    ("请发到jane@example.com谢谢", None, "请发到{{EMAIL}}谢谢"),
    ("メールはjane.doe@example.co.jpまで", None, "メールは{{EMAIL}}まで"),
    ("이메일jane@example.com으로", None, "이메일{{EMAIL}}으로"),
    ("张三@例子.中国", None, "{{EMAIL}}"),  # an address in Chinese is masked whole
    ("Serial abc1234567890def stays", None, None),
    # Dates, times, prices and short numbers are not personal data.
    ("On 2024-01-15 at 10:30 I paid $1,299.00 for 2 items, ref 12345", None, None),
    ("Bitext placeholders like {{Order Number}} stay as they are.", None, None),
    # The customer's own details, whatever their form in the text.
    (
        "I'm Jane Doe (jane.doe@example.com, 020 7946 0958), 12 Baker Street, London NW1 6XE.",
        JANE,
        "I'm {{NAME}} ({{EMAIL}}, {{PHONE}}), {{ADDRESS}}.",
    ),
    ("JANE.DOE@EXAMPLE.COM wrote: thanks, Jane", JANE, "{{EMAIL}} wrote: thanks, {{NAME}}"),
    (
        "order 113542617735902, {{113542617735902}}, account ACC-7788, bill #00108",
        JANE,
        "order {{ORDER_ID}}, {{ORDER_ID}}, account {{ACCOUNT_ID}}, bill {{INVOICE_ID}}",
    ),
    ("Please update London NW1 6XE records", JANE, "Please update {{ADDRESS}} records"),
    # A name part is matched case-sensitively: "will" is not the customer "Will".
    ("I will call Will Smith", CustomerFields.from_values(name="Will Smith"), "I will call {{NAME}}"),
    ("Dear Mr. Jones, Jones here", CustomerFields.from_values(name="Mr. Jones"), "Dear {{NAME}}, {{NAME}} here"),
]


@pytest.mark.parametrize(("text", "customer", "expected"), GOLDEN)
def test_golden_cases(text, customer, expected):
    result = redact(text, customer)
    assert result.text == (text if expected is None else expected)
    assert not find_pii(result.text, customer)
    assert redact(result.text, customer).text == result.text


def test_counts_by_type():
    result = redact("a@b.io c@d.io, +1 202-555-0143, Jane", JANE)
    assert result.counts == {"EMAIL": 2, "PHONE": 1, "NAME": 1}


def test_obfuscated_email_is_not_rewritten_but_found():
    text = "write to jane [at] example [dot] com or jo(at)example.org"
    result = redact(text)
    assert result.text == text
    assert result.residual == {"EMAIL": 2}
    assert find_pii(text) == {"EMAIL": 2}
    # A plain "at" needs a spelled-out "dot" to count: this is an ordinary sentence.
    assert not find_pii("have a look at example.com")
    # Chinese text runs straight into the address: no \b after its ".com".
    assert find_pii("请写信给jane [at] example [dot] com谢谢") == {"EMAIL": 1}


def test_find_pii_sees_what_redaction_removes():
    raw = "jane.doe@example.com, 4111 1111 1111 1111, GB82 WEST 1234 5698 7654 32"
    assert find_pii(raw) == {"EMAIL": 1, "CARD": 1, "IBAN": 1}
    assert find_pii(raw.replace("jane.doe@example.com", "Jane Doe"), JANE) == {"NAME": 1, "CARD": 1, "IBAN": 1}


def test_validators():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    # Invalid checksums are not redacted as cards or IBANs.
    assert "{{CARD}}" not in redact("4111 1111 1111 1112").text
    assert redact("GB82 WEST 1234 5698 7654 33").text != "{{IBAN}}"


# --- properties ----------------------------------------------------------------------------

_filler = st.text(alphabet="abcdefghij klmnopqrstuvwxyz,.!?ABCDEF", max_size=40)
_local = st.from_regex(r"[a-z0-9]([a-z0-9._+-]{0,15}[a-z0-9])?", fullmatch=True)
_label = st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)
_email = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    _local,
    st.lists(_label, min_size=1, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _digits(n: int):
    return st.text(alphabet="0123456789", min_size=n, max_size=n)


_phone = st.one_of(
    st.builds(lambda cc, a, b, c: f"+{cc} {a} {b} {c}", st.integers(1, 999), _digits(3), _digits(3), _digits(4)),
    st.builds(lambda cc, a, b, c: f"+{cc}-{a}-{b}-{c}", st.integers(1, 99), _digits(3), _digits(3), _digits(4)),
    st.builds(lambda a, b, c: f"({a}) {b}-{c}", _digits(3), _digits(3), _digits(4)),
    st.builds(lambda a, b, c: f"{a}-{b}-{c}", _digits(3), _digits(3), _digits(4)),
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", _digits(3), _digits(3), _digits(4)),
    st.builds(lambda a, b, c: f"0{a} {b} {c}", _digits(2), _digits(4), _digits(4)),
    st.builds(lambda cc, a, b, c: f"00{cc} {a} {b} {c}", st.integers(1, 99), _digits(2), _digits(4), _digits(4)),
)


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


@st.composite
def _card(draw):
    length = draw(st.sampled_from([15, 16]))
    prefix = draw(st.sampled_from("3456"))
    number = _luhn_complete(prefix + draw(_digits(length - 2)))
    style = draw(st.sampled_from(["bare", "space", "dash"]))
    if style == "bare":
        return number
    sep = " " if style == "space" else "-"
    groups = [number[:4], number[4:10], number[10:]] if length == 15 else [number[i : i + 4] for i in (0, 4, 8, 12)]
    return sep.join(groups)


@_PROPERTY
@given(before=_filler, email=_email, after=_filler)
def test_property_emails_are_redacted(before, email, after):
    result = redact(f"{before} {email} {after}")
    assert email not in result.text
    assert "{{EMAIL}}" in result.text
    assert redact(result.text).text == result.text


@_PROPERTY
@given(before=_filler, phone=_phone, after=_filler)
def test_property_phones_are_redacted(before, phone, after):
    result = redact(f"{before} {phone} {after}")
    assert phone not in result.text
    assert "{{PHONE}}" in result.text
    assert redact(result.text).text == result.text


@_PROPERTY
@given(before=_filler, card=_card(), after=_filler)
def test_property_cards_are_redacted(before, card, after):
    result = redact(f"{before} {card} {after}")
    assert card not in result.text
    assert result.counts["CARD"] == 1
    assert redact(result.text).text == result.text


@_PROPERTY
@given(card=_card())
def test_property_non_luhn_numbers_are_not_cards(card):
    last = card[-1]
    broken = card[:-1] + str((int(last) + 1) % 10)
    assert "{{CARD}}" not in redact(f"number {broken} here").text


_pii_text = st.lists(
    st.one_of(_filler, _email, _phone, _card(), st.sampled_from(["Jane", "Doe", "{{EMAIL}}", "{{", "}}", "#"])),
    max_size=8,
).map(" ".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=200), _pii_text))
def test_property_redaction_is_idempotent(text):
    once = redact(text, JANE)
    assert redact(once.text, JANE).text == once.text
    assert not (find_pii(once.text, JANE) - once.residual)
