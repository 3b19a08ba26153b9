"""Fill template slots in a bot reply, so a customer never sees ``{{…}}`` or ``[…]``.

Past replies, and so the model's, are full of slots: Bitext writes
``{{Customer Support Phone Number}}``, ``{{Website URL}}``, ``{{Order Number}}``,
sometimes ``[Live Chat]`` or a slot in brackets, ``[{{Website Name}}]`` (filled as one
slot, brackets and all); redacted tickets hold ``{{PHONE}}``, ``{{ORDER_ID}}``,
``{{NAME}}``. Each slot is filled, in this order of preference, from:

1. the company's facts (``facts``: ``company_name``, ``support_phone``,
   ``support_email``, ``website_url``, ``website_name``, ``support_hours``,
   ``returns_address``; the bot profile in the admin),
2. values the customer gave in this conversation (``values``: ``order``, ``invoice``,
   ``account``, ``tracking``, ``name``, ``email``, ``phone``, ``address``; see
   ``customer_values``),
3. neutral words: "our website", "your order", "during business hours"; a name
   nobody gave is left out with its comma ("No worries, {{NAME}}, I'm here" ->
   "No worries, I'm here"), and a slot naming a screen or button keeps its words
   ("open {{Order Details}}" -> "open Order Details").

``fill_placeholders(text, facts, values)`` fills a whole reply. ``PlaceholderFiller``
does the same on a stream: ``push(delta)`` returns the text that is final, holding
back a slot until it closes (across any token boundary) and the last few words,
which a following slot may still rewrite ("order {{ORDER_ID}}" -> "your order");
``flush()`` returns the rest. Whatever is pushed, the streamed text equals the
whole-reply result, and no ``{{`` or ``[slot]`` is ever returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FACT_KEYS = (
    "company_name",
    "support_phone",
    "support_email",
    "website_url",
    "website_name",
    "support_hours",
    "returns_address",
)
VALUE_KEYS = ("order", "invoice", "account", "tracking", "name", "email", "phone", "address")

_CURLY_RE = re.compile(r"\{\{\s*([^{}\n]{1,60}?)\s*\}\}")
# A curly slot inside square brackets is one slot, brackets included: Bitext writes
# "visit [{{Website Name}}]", which filled inside the brackets would still show "[our website]".
_BRACKETED_RE = re.compile(r"\[[ \t]*" + _CURLY_RE.pattern + r"[ \t]*\](?!\()")
# A square-bracket slot is a short label of words; "[text](url)" is a Markdown link, not a slot.
_SQUARE_BODY = r"[A-Za-z][A-Za-z0-9 _/.'&-]{0,40}"
_SQUARE_RE = re.compile(r"\[(" + _SQUARE_BODY + r")\](?!\()")
# Bracketed first: at a "[" the bracketed slot is tried before the curly slot inside it is reached.
_SLOT_RE = re.compile(_BRACKETED_RE.pattern + "|" + _CURLY_RE.pattern + "|" + _SQUARE_RE.pattern)
_SQUARE_PREFIX_RE = re.compile(r"\[(?:" + _SQUARE_BODY + r")?$")

_DETERMINER_RE = re.compile(r"(?i)\b(?:our|the|your|its|their|this|that)\s+$")
_ID_NOUNS = "order|purchase|invoice|bill|account|refund|reservation|booking|tracking|ticket|reference|case"
_ID_PHRASE_RE = re.compile(
    r"(?i)\b(?:(?:the|your|this|that)\s+)?(" + _ID_NOUNS + r")(?:\s+(?:number|no\.?|#|id))?\s*[:#]?\s*$"
)
_ID_WORD_RE = re.compile(r"(?i)\b(?:number|no\.?|#|id)\s*[:#]?\s*$")
_GREETING_RE = re.compile(r"(?i)\b(hi|hello|hey|dear)\s+$")
_SEPARATOR_TAIL_RE = re.compile(r"[ \t]*,?[ \t]*$")
# Words a later slot may rewrite ("your order number: " before {{ORDER_ID}}) stay held while streaming.
_HOLD_WORDS = 4


@dataclass(frozen=True)
class _Neutral:
    core: str  # used after a determiner: "our {{Website Name}}" -> "our website"
    full: str  # used elsewhere: "visit {{Website URL}}" -> "visit our website"


_NEUTRAL = {
    "support_phone": _Neutral("customer support phone line", "our customer support phone line"),
    "support_email": _Neutral("support e-mail address", "our support e-mail address"),
    "website": _Neutral("website", "our website"),
    "support_hours": _Neutral("support hours", "during business hours"),
    "company_name": _Neutral("company", "our company"),
    "returns_address": _Neutral("returns address", "our returns address"),
    "email": _Neutral("e-mail address", "your e-mail address"),
    "phone": _Neutral("phone number", "your phone number"),
    "address": _Neutral("address", "your address"),
    "card": _Neutral("card", "your card"),
    "iban": _Neutral("bank account", "your bank account"),
    "days": _Neutral("few days", "a few days"),
    "amount": _Neutral("applicable amount", "the applicable amount"),
    "date": _Neutral("date shown in your account", "the date shown in your account"),
}
_ID_KINDS = {"order": "order number", "invoice": "invoice number", "account": "account", "tracking": "tracking number"}


def slot_kind(name: str) -> str:
    """What a slot stands for, from its name ("Customer Support Phone Number" -> "support_phone")."""
    raw = name.strip()
    upper = raw.upper()
    redaction = {
        "EMAIL": "email",
        "PHONE": "phone_any",
        "CARD": "card",
        "IBAN": "iban",
        "URL": "website",
        "NUMBER": "order",
        "NAME": "name",
        "ADDRESS": "address",
        "ACCOUNT_ID": "account",
        "ORDER_ID": "order",
        "INVOICE_ID": "invoice",
    }
    if raw == upper and upper in redaction:
        return redaction[upper]
    n = " " + re.sub(r"[^a-z0-9]+", " ", raw.lower().replace("anonymized", "")).strip() + " "
    has = lambda *words: any(f" {w} " in n for w in words)  # noqa: E731 - a one-line local helper
    customer = has("customer", "client", "your", "user") and not has("support", "service", "care", "help")
    if has("phone", "telephone", "hotline", "helpline", "toll"):
        return "phone" if customer else "support_phone"
    if has("email", "e mail", "mail"):
        return "email" if customer else "support_email"
    if has("url", "website", "site", "webpage", "web"):
        return "website"
    if has("hours", "availability", "available", "opening"):
        return "support_hours"
    if has("company", "store", "business", "brand") and has("name") or n.strip() in {"company", "store"}:
        return "company_name"
    if has("address"):
        if has("return", "returns", "warehouse", "office", "our", "company"):
            return "returns_address"
        if has("shipping", "delivery", "billing") and not customer:
            return "label"
        return "address"
    if has("tracking") and has("number", "id", "code"):
        return "tracking"
    if has("order", "purchase", "transaction") and has("number", "id", "no"):
        return "order"
    if has("invoice", "bill", "receipt") and has("number", "id", "no"):
        return "invoice"
    if has("account") and has("number", "id", "no"):
        return "account"
    if has("name") and (has("customer", "client", "person", "field", "first", "last", "full", "user") or n == " name "):
        return "name"
    if has("days", "day", "weeks"):
        return "days"
    if has("amount", "fee", "price", "cost", "sum", "total"):
        return "amount"
    if has("date"):
        return "date"
    return "label"


def _capitalise_if_sentence_start(text: str, before: str) -> str:
    stripped = before.rstrip(" \t")
    if text and (not stripped or stripped.endswith((".", "!", "?", "\n", ":"))) and not before.endswith(":"):
        return text[0].upper() + text[1:]
    return text


def _resolve(name: str, before: str, after: str, facts: Mapping[str, str], values: Mapping[str, str]):
    """``(replacement, characters of before to remove)`` for one slot."""
    kind = slot_kind(name)
    if kind == "phone_any":  # {{PHONE}} is the company's line unless the reply addresses the customer's
        kind = "phone" if re.search(r"(?i)\b(?:you at|your)\s*$", before) else "support_phone"
    fact_key = {"website": None}.get(kind, kind)
    if kind == "website":
        value = facts.get("website_url") or facts.get("website_name")
        if value:
            # "our {{Website URL}}" -> "https://acme.example", not "our https://acme.example".
            determiner = _DETERMINER_RE.search(before) if "." in value else None
            return value, (len(before) - determiner.start()) if determiner else 0
    elif fact_key in FACT_KEYS and facts.get(fact_key):
        return facts[fact_key], 0
    if kind in {"email", "phone", "address"} and values.get(kind):
        return values[kind], 0
    if kind in _ID_KINDS:
        if values.get(kind):
            return values[kind], 0
        phrase = _ID_PHRASE_RE.search(before)
        if phrase:
            noun = phrase.group(1).lower()
            text = f"your {noun} number" if noun == "tracking" else f"your {noun}"
            return _capitalise_if_sentence_start(text, before[: phrase.start()]), len(before) - phrase.start()
        if _ID_WORD_RE.search(before):
            return "you provided", 0
        if _DETERMINER_RE.search(before):  # "check the {{Order Number}}" -> "check the order number"
            return _ID_KINDS[kind], 0
        text = "your " + _ID_KINDS[kind]
        return _capitalise_if_sentence_start(text, before), 0
    if kind == "name":
        if values.get("name"):
            return values["name"], 0
        greeting = _GREETING_RE.search(before)
        if greeting:
            return ("customer" if greeting.group(1).lower() == "dear" else "there"), 0
        tail = _SEPARATOR_TAIL_RE.search(before)
        consumed = len(tail.group()) if tail else 0
        if after[:1].isalnum():
            return (", " if "," in tail.group() else " ") if consumed else "", consumed
        return "", consumed
    if kind in _NEUTRAL:
        neutral = _NEUTRAL[kind]
        text = neutral.core if _DETERMINER_RE.search(before) else neutral.full
        return _capitalise_if_sentence_start(text, before), 0
    # A screen, button or section name: its own words.
    words = " ".join(re.sub(r"[_]+", " ", name).split())
    return (words.lower() if words.isupper() else words), 0


def fill_placeholders(
    text: str, facts: Mapping[str, str] | None = None, values: Mapping[str, str] | None = None
) -> str:
    """``text`` with every complete slot filled (see the module docstring) and stray braces removed."""
    return _sanitise(_fill(text, facts or {}, values or {}), final=True)


def _fill(text: str, facts: Mapping[str, str], values: Mapping[str, str]) -> str:
    out = ""
    last = 0
    for match in _SLOT_RE.finditer(text):
        out += text[last : match.start()]
        name = next(group for group in match.groups() if group is not None)
        replacement, consumed = _resolve(name, out, text[match.end() : match.end() + 1], facts, values)
        if consumed:
            out = out[:-consumed]
        out += replacement
        last = match.end()
    return out + text[last:]


def _sanitise(text: str, *, final: bool) -> str:
    """Remove what is left of a slot: a brace pair's debris, and at the end an unclosed slot."""
    if final:
        text = re.sub(r"\{\{[^{}\n]*$", "", text)  # a slot cut off by the end of generation
        text = _SQUARE_PREFIX_RE.sub("", text) if _SQUARE_PREFIX_RE.search(text) else text
    text = text.replace("{{", "").replace("}}", "")
    return text


def customer_values(messages: Iterable[Mapping[str, str]], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values the customer gave in the conversation (their latest mention wins), over ``known``.

    ``known`` holds what the help desk already knows (the customer's name and e-mail);
    an order number the customer wrote in this chat is found here.
    """
    values = {k: v for k, v in (known or {}).items() if v}
    for message in messages:
        if message.get("role") != "customer":
            continue
        text = message.get("content") or ""
        for match in _VALUE_RE.finditer(text):
            noun = match.group("noun").lower()
            key = {"purchase": "order", "bill": "invoice", "receipt": "invoice"}.get(noun, noun)
            values[key] = match.group("value")
        email = _EMAIL_RE.search(text)
        if email:
            values["email"] = email.group()
        if "order" not in values:
            bare = _BARE_NUMBER_RE.search(text)
            if bare:
                values["order"] = bare.group()
    return values


_VALUE_RE = re.compile(
    r"(?i)\b(?P<noun>order|purchase|invoice|bill|receipt|account|tracking)"
    r"(?:\s+(?:number|no\.?|#|id|code))?\s*[:#]?\s*(?P<value>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{2,})\b"
)
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_BARE_NUMBER_RE = re.compile(r"(?<![\w+])\d{5,}(?![\w])")


class PlaceholderFiller:
    """``fill_placeholders`` on a stream of text pieces; see the module docstring."""

    def __init__(self, facts: Mapping[str, str] | None = None, values: Mapping[str, str] | None = None):
        self.facts = dict(facts or {})
        self.values = dict(values or {})
        self.raw = ""
        self._sent = ""

    def push(self, delta: str) -> str:
        self.raw += delta
        filled = _sanitise(_fill(self.raw[: self._stable_end()], self.facts, self.values), final=False)
        # The last words of the filled text wait: a slot still to come may rewrite them
        # ("your order number: " before {{ORDER_ID}} becomes "your order").
        words = list(re.finditer(r"\S+", filled))
        stable = filled[: words[-_HOLD_WORDS].start()] if len(words) >= _HOLD_WORDS else ""
        if len(stable) <= len(self._sent) or not stable.startswith(self._sent):
            return ""
        out = stable[len(self._sent) :]
        self._sent = stable
        return out

    def flush(self) -> str:
        """The rest of the reply: call once when generation has ended."""
        final = fill_placeholders(self.raw, self.facts, self.values)
        if not final.startswith(self._sent):  # cannot happen for text built by push; kept safe anyway
            final = self._sent + final[len(self._sent) :]
        out = final[len(self._sent) :]
        self._sent = final
        return out

    @property
    def text(self) -> str:
        """Everything returned so far (the filled reply once ``flush`` was called)."""
        return self._sent

    def _stable_end(self) -> int:
        """How much of ``raw`` holds only complete slots, each with the character after it."""
        raw = self.raw
        end = len(raw)
        # An unclosed "{" or "[" may still become a slot.
        brace = raw.rfind("{")
        # (Not a slot once it runs past a line break or a slot's length.)
        if brace != -1 and "}}" not in raw[brace:] and "\n" not in raw[brace:] and len(raw) - brace <= 66:
            opening = brace - 1 if brace > 0 and raw[brace - 1] == "{" else brace
            end = min(end, opening)
        square = _SQUARE_PREFIX_RE.search(raw)
        if square:
            end = min(end, square.start())
        # A slot that just closed waits for the next character ("[Live Chat](" is a link;
        # an omitted name needs to know whether punctuation follows).
        for match in _SLOT_RE.finditer(raw[:end]):
            if match.end() == end:
                end = match.start()
        return end
