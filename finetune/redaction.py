"""Replace personal data in ticket text with typed placeholders such as ``{{EMAIL}}``.

Pure functions, no Django: the dataset builder calls them on every turn before
anything is written, and tests call them directly.

Two kinds of redaction run together:

- **Patterns** any text can contain: e-mail addresses, phone numbers, payment
  card numbers (Luhn-checked), IBANs (mod-97-checked), URLs carrying tokens or
  credentials, and long bare digit runs (8+ digits: order, account or tracking
  numbers written without separators).
- **The ticket's own customer fields** (:class:`CustomerFields`): name, e-mail,
  phone, postal address and order/account numbers. Pattern matchers find no
  names (see NOTES-reliability: Presidio without spaCy finds none either), so the
  values the help desk already knows are looked for explicitly.

Redaction is idempotent: placeholders are never touched again, and ``redact``
repeats its pass until the text no longer changes, so ``redact(redact(t)) ==
redact(t)``. :func:`find_pii` is the independent check run afterwards: it looks
with the same detectors plus looser ones (obfuscated e-mails such as
``jane [at] example [dot] com``) and the dataset builder drops any example it
still flags.

    >>> redact("Mail me at jane@example.com").text
    'Mail me at {{EMAIL}}'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD"
IBAN = "IBAN"
URL = "URL"
NUMBER = "NUMBER"
NAME = "NAME"
ADDRESS = "ADDRESS"
ACCOUNT_ID = "ACCOUNT_ID"
ORDER_ID = "ORDER_ID"
INVOICE_ID = "INVOICE_ID"
PLACEHOLDER_TYPES = (EMAIL, PHONE, CARD, IBAN, URL, NUMBER, NAME, ADDRESS, ACCOUNT_ID, ORDER_ID, INVOICE_ID)

# Kinds of customer identifiers (``{"type": "order", "value": "A-1"}``) and their placeholder.
IDENTIFIER_TYPES = {"order": ORDER_ID, "invoice": INVOICE_ID, "account": ACCOUNT_ID}

# Only this project's own placeholders are protected from further redaction. Other
# double-brace text (Bitext writes "{{Order Number}}") is ordinary text: protecting
# any "{{...}}" would let "{{jane@example.com}}" through.
_PLACEHOLDER_RE = re.compile(r"\{\{(?:" + "|".join(PLACEHOLDER_TYPES) + r")\}\}")
# A redacted value that was already wrapped in braces ("{{113542617735902}}") would
# otherwise become "{{{{ORDER_ID}}}}".
_DOUBLE_WRAPPED_RE = re.compile(r"\{\{(\{\{(?:" + "|".join(PLACEHOLDER_TYPES) + r")\}\})\}\}")


def placeholder(kind: str) -> str:
    return "{{" + kind + "}}"


# --- validators ------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    compact = re.sub(r"\s+", "", candidate).upper()
    if not (15 <= len(compact) <= 34) or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    if not compact.isalnum() or not compact.isascii():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


# --- pattern detectors -----------------------------------------------------------------

# Local part and domain use \w so non-ASCII addresses ("jörg@beispiel.de") are found too.
_EMAIL_RE = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
# Written to dodge filters: "jane [at] example [dot] com", "jane(at)example.com". Only
# find_pii looks for these; an example containing one is dropped rather than guessed at.
_AT = r"(?:\[at\]|\(at\)|\{at\}|<at>)"
_DOT = r"(?:\[dot\]|\(dot\)|\{dot\}|<dot>)"
_TLD = r"(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|be|ch|at|eu|info|biz|me)\b"
# Matched from the "at" outwards (a pattern starting with the local part would be
# tried at every position of every text, which made it the slowest detector).
_OBFUSCATED_AT_RE = re.compile(rf"(?i)(?<=[\w.+-])(?:\s*{_AT}\s*|\s+at\s+)(?=[\w-])")
_OBFUSCATED_DOMAIN_RE = re.compile(rf"(?i)[\w-]+(?:\s*(?:{_DOT}|\.)\s*[\w-]+)*?\s*(?:{_DOT}|\.)\s*{_TLD}")
# After a plain " at ", the dot must be spelled out too: "look at example.com" is no address.
_OBFUSCATED_SPOKEN_DOMAIN_RE = re.compile(rf"(?i)[\w-]+(?:\s+dot\s+[\w-]+)*?\s+dot\s+{_TLD}")
_MAX_PASSES = 4
_URL_RE = re.compile(r"(?:\bhttps?://|\bwww\.)[^\s<>\"'`{}|\\^]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?)]"
_SENSITIVE_PARAM_RE = re.compile(
    r"(?:^|[?&;])(?:[\w.-]*(?:token|key|secret|passw(?:or)?d|pwd|auth|sig|signature|session|sid|jwt|otp|code|"
    r"hash|nonce|credential|reset|invite|magic))=",
    re.IGNORECASE,
)
# A path or query segment that looks generated: 16+ URL-safe characters mixing
# letters and digits, or 20+ hex digits. Ordinary slugs ("how-to-reset") pass.
_TOKENISH_RE = re.compile(r"[A-Za-z0-9_\-]{16,}")
_URL_USERINFO_RE = re.compile(r"^(?:https?://)[^/@\s]+:[^/@\s]+@", re.IGNORECASE)

_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
_CARD_RE = re.compile(
    r"(?<![\w-])(?:"
    r"\d{4}(?P<s1>[ -]?)\d{4}(?P=s1)\d{4}(?P=s1)\d{4}(?:(?P=s1)\d{1,3})?"  # 16 (Visa, MC), up to 19
    r"|\d{4}(?P<s2>[ -]?)\d{6}(?P=s2)\d{4,5}"  # 14-15 (Amex, Diners)
    r"|\d{13,19}"
    r")(?![\w-])"
)
_PHONE_RE = re.compile(r"(?<![\w+#])(?:\+|\b00)?\(?\d[\d ().\-]{5,22}\d(?![\w])")
# Seven digits with at most one separator between each: every card, IBAN, phone and
# long number contains such a run, and most support text does not.
_DIGIT_RUN_RE = re.compile(r"\d(?:[ ().\-]{0,2}\d){6}")
_PHONE_GROUP_SPLIT = re.compile(r"[ ().\-]+")
_PHONE_TOKEN_RE = re.compile(r"(?:\+|\b00)?\(?\d+\)?")
_DATE_LIKE_RE = re.compile(r"^(?:\d{4}[-.]\d{1,2}[-.]\d{1,2}|\d{1,2}[-.]\d{1,2}[-.]\d{2,4})$")
# Eight or more bare digits: order, account, tracking or phone numbers written without
# separators. Shorter runs are too often quantities, years or prices.
_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9])#?\d{8,}(?![A-Za-z0-9])")


def _url_has_secret(url: str) -> bool:
    if _URL_USERINFO_RE.match(url):
        return True
    _, _, after_host = url.partition("//")
    rest = after_host.partition("/")[2] if after_host else url.partition("/")[2]
    path, _, query = rest.partition("?")
    if query and _SENSITIVE_PARAM_RE.search("?" + query):
        return True
    for segment in _TOKENISH_RE.findall(path + "/" + query):
        has_digit = any(c.isdigit() for c in segment)
        has_alpha = any(c.isalpha() for c in segment)
        is_hex = len(segment) >= 20 and all(c in "0123456789abcdefABCDEF" for c in segment)
        if (has_digit and has_alpha) or is_hex:
            return True
    return False


def _card_ok(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    # Issuer prefixes 2-6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4, MC 5, Discover 6);
    # other Luhn-valid runs are more likely order numbers, which NUMBER covers.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _phone_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if not 7 <= len(digits) <= 15 or _DATE_LIKE_RE.match(text):
        return False
    if text.count("(") != text.count(")"):
        return False
    groups = [g for g in _PHONE_GROUP_SPLIT.split(text.lstrip("+")) if g]
    if text.startswith("+") or (text.startswith("00") and text[2:3] not in ("0", "") and len(groups) > 1):
        return True  # a bare "00123842" is more likely an order number than a dialled prefix
    if len(digits) > 12:  # national numbers are at most 12 digits; longer ones carry a country code
        return False
    if "(" in text:
        return True
    # Without a country code or area-code parentheses a phone number is written in
    # groups ("555-123-4567", "020 7946 0958"); a single bare run is left to NUMBER.
    if len(groups) == 2:
        return all(len(g) >= 3 for g in groups)  # "555-0134", "0612 345678"
    if len(groups) < 2:
        return False
    return all(len(g) >= 2 for g in groups[1:])


def _sub_phones(text: str, counts: Counter) -> str:
    """Replace phone numbers, splitting a run of several ("555 123 4567 555 765 4321") into each.

    The candidate regex is deliberately loose, so a run that is not one phone number
    is searched for the longest valid number starting at each digit group.
    """

    def replace(match: re.Match) -> str:
        candidate = match.group()
        if _phone_ok(candidate):
            counts[PHONE] += 1
            return placeholder(PHONE)
        groups = [(g.start(), g.end()) for g in _PHONE_TOKEN_RE.finditer(candidate)]
        pieces: list[str] = []
        last = i = 0
        while i < len(groups):
            for j in range(len(groups) - 1, i - 1, -1):
                if _phone_ok(candidate[groups[i][0] : groups[j][1]]):
                    pieces += [candidate[last : groups[i][0]], placeholder(PHONE)]
                    counts[PHONE] += 1
                    last, i = groups[j][1], j + 1
                    break
            else:
                i += 1
        pieces.append(candidate[last:])
        return "".join(pieces)

    return _PHONE_RE.sub(replace, text)


def _iban_ok(match: re.Match) -> bool:
    return iban_valid(match.group())


# --- the ticket's own customer fields ----------------------------------------------------


@dataclass(frozen=True)
class CustomerFields:
    """What the help desk knows about the customer; every value found in the text is redacted."""

    name: str = ""
    email: str = ""
    phone: str = ""
    address: str = ""
    # (placeholder kind, value), e.g. (ORDER_ID, "113542617735902")
    identifiers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def from_values(
        cls,
        *,
        name: str = "",
        email: str = "",
        phone: str = "",
        address: str = "",
        identifiers: Iterable[str | Mapping[str, str]] = (),
    ) -> CustomerFields:
        """Build from ticket fields; identifiers are strings or ``{"type": ..., "value": ...}``."""
        parsed: list[tuple[str, str]] = []
        for item in identifiers or ():
            if isinstance(item, Mapping):
                kind = IDENTIFIER_TYPES.get(str(item.get("type", "")).lower(), ACCOUNT_ID)
                value = str(item.get("value", ""))
            else:
                kind, value = ACCOUNT_ID, str(item)
            if value.strip():
                parsed.append((kind, value.strip()))
        return cls(
            name=(name or "").strip(),
            email=(email or "").strip(),
            phone=(phone or "").strip(),
            address=(address or "").strip(),
            identifiers=tuple(parsed),
        )

    def is_empty(self) -> bool:
        return not (self.name or self.email or self.phone or self.address or self.identifiers)


_HONORIFICS = {"mr", "mrs", "ms", "miss", "dr", "prof", "sir", "madam", "mx"}
_SEP = r"[\s().\-]*"


def _flexible_words(value: str) -> str:
    """A regex for ``value`` that tolerates different whitespace and commas between its words."""
    words = [re.escape(w) for w in re.split(r"[\s,]+", value) if w]
    return r"[\s,]+".join(words)


def _phone_value_pattern(value: str) -> str | None:
    digits = re.sub(r"\D", "", value)
    if len(digits) < 7:
        return None
    if len(digits) > 10:
        # "+44 20 7946 0958" is also written "020 7946 0958" at home: country code optional,
        # a trunk 0 allowed in its place.
        country, national = digits[:-10], digits[-10:]
        head = rf"(?:(?:\+|00)?{re.escape(country)}{_SEP}(?:\(0\){_SEP})?|\(?0\)?{_SEP})?"
    else:
        national, head = digits, r"(?:\+)?"
    return head + _SEP.join(national)


@dataclass(frozen=True)
class _KnownPattern:
    """One regex over several known values, and cheap tests that say when it is worth running.

    Running a dozen-value alternation at every position of every text costs more than
    all the generic detectors; most texts mention none of the customer's values, and a
    substring test on the lower-cased text rules that out.
    """

    regex: re.Pattern
    anchors: tuple[str, ...]  # lower-case substrings, one of which every match contains
    digits: bool  # some value (a phone number) has no fixed substring: run whenever a digit run is present

    def applies(self, lowered: str) -> bool:
        if self.digits and _DIGIT_RUN_RE.search(lowered):
            return True
        return any(anchor in lowered for anchor in self.anchors)


def _known_patterns(customer: CustomerFields) -> tuple[_KnownPattern | None, _KnownPattern | None]:
    return _compile_known(customer.name, customer.email, customer.phone, customer.address, customer.identifiers)


def _longest_word(value: str) -> str:
    return max(re.split(r"[\s,]+", value), key=len).lower()


@lru_cache(maxsize=2048)
def _compile_known(
    name: str, email: str, phone: str, address: str, identifiers: tuple[tuple[str, str], ...]
) -> tuple[_KnownPattern | None, _KnownPattern | None]:
    """Two patterns: values matched before the generic detectors, and names matched after.

    Names go last so that "jane.doe@example.com" is one {{EMAIL}}, not "{{NAME}}.doe@…".
    Values are tried longest first, so a full address wins over one of its lines.
    """
    early: list[tuple[int, str, str, str | None]] = []  # (length, kind, regex, anchor; None = any digit)
    if email:
        early.append((len(email), EMAIL, rf"(?i:{re.escape(email)})", email.lower()))
    if phone:
        pattern = _phone_value_pattern(phone)
        if pattern:
            early.append((len(phone), PHONE, pattern, None))
    if address:
        early.append((len(address), ADDRESS, rf"(?i:{_flexible_words(address)})", _longest_word(address)))
        for part in re.split(r"[,\n;]+", address):
            part = part.strip()
            # A street line or a postcode + town carries a digit; a bare town or country does not identify.
            if len(part) >= 5 and any(c.isdigit() for c in part) and part != address:
                early.append((len(part), ADDRESS, rf"(?i:{_flexible_words(part)})", _longest_word(part)))
    for kind, value in identifiers:
        bare = value.lstrip("#")
        if len(bare) >= 4:  # shorter "numbers" (e.g. "12") match too much ordinary text
            early.append((len(bare), kind, rf"(?i:#?{re.escape(bare)})", bare.lower()))

    late: list[tuple[int, str, str, str | None]] = []
    if name:
        late.append((len(name), NAME, rf"(?i:{_flexible_words(name)})", _longest_word(name)))
        for part in re.split(r"[\s,]+", name):
            stripped = part.strip(".")
            if len(stripped) >= 3 and stripped.lower() not in _HONORIFICS:
                # Case-sensitive: a customer called "Will" or "Bill" should not eat "will" or "bill".
                late.append((len(stripped), NAME, re.escape(stripped), stripped.lower()))

    def build(items: list[tuple[int, str, str, str | None]]) -> _KnownPattern | None:
        if not items:
            return None
        items.sort(key=lambda item: -item[0])
        alternatives = "|".join(f"(?P<{kind}_{i}>{regex})" for i, (_, kind, regex, _) in enumerate(items))
        return _KnownPattern(
            regex=re.compile(rf"(?<![\w@+#])(?:{alternatives})(?![\w@])"),
            anchors=tuple(dict.fromkeys(anchor for *_, anchor in items if anchor)),
            digits=any(anchor is None for *_, anchor in items),
        )

    return build(early), build(late)


def _kind_of(match: re.Match) -> str:
    group = match.lastgroup or ""
    return group.rsplit("_", 1)[0]


# --- redaction ----------------------------------------------------------------------------


@dataclass
class Redacted:
    text: str
    counts: Counter = field(default_factory=Counter)  # replacements made, by placeholder type
    # What find_pii(text) would report: personal data still detected in the result
    # (only when redaction could not settle, or an obfuscated e-mail address).
    residual: Counter = field(default_factory=Counter)


def _sub(pattern: re.Pattern, kind: str, text: str, counts: Counter, check=None) -> str:
    def replace(match: re.Match) -> str:
        if check is not None and not check(match):
            return match.group()
        counts[kind] += 1
        return placeholder(kind)

    return pattern.sub(replace, text)


def _sub_known(pattern: _KnownPattern | None, text: str, counts: Counter) -> str:
    if pattern is None or not pattern.applies(text.lower()):
        return text

    def replace(match: re.Match) -> str:
        kind = _kind_of(match)
        counts[kind] += 1
        return placeholder(kind)

    return pattern.regex.sub(replace, text)


def _sub_urls(text: str, counts: Counter) -> str:
    def replace(match: re.Match) -> str:
        url = match.group()
        stripped = url.rstrip(_URL_TRAILING)
        tail = url[len(stripped) :]
        if not _url_has_secret(stripped):
            return url
        counts[URL] += 1
        return placeholder(URL) + tail

    return _URL_RE.sub(replace, text)


_URL_HINT_RE = re.compile(r"(?i)://|www\.")


def _redact_segment(text: str, early: _KnownPattern | None, late: _KnownPattern | None, counts: Counter) -> str:
    text = _sub_known(early, text, counts)
    # Cheap tests first: most support text has no "@", no URL and no long digit run, and
    # skipping a detector that cannot match is most of the speed of a dataset build.
    if _URL_HINT_RE.search(text):
        text = _sub_urls(text, counts)
    if "@" in text:
        text = _sub(_EMAIL_RE, EMAIL, text, counts)
    if _DIGIT_RUN_RE.search(text):
        text = _sub(_IBAN_RE, IBAN, text, counts, _iban_ok)
        text = _sub(_CARD_RE, CARD, text, counts, _card_ok)
        text = _sub_phones(text, counts)
        text = _sub(_NUMBER_RE, NUMBER, text, counts)
    return _sub_known(late, text, counts)


def _obfuscated_emails(text: str) -> int:
    """How many e-mail addresses written to dodge filters ("jane [at] example [dot] com") ``text`` holds."""
    found = 0
    for at in _OBFUSCATED_AT_RE.finditer(text):
        spoken = "at" == at.group().strip().lower()
        domain = _OBFUSCATED_SPOKEN_DOMAIN_RE if spoken else _OBFUSCATED_DOMAIN_RE
        if domain.match(text, at.end()):
            found += 1
    return found


def _redact_once(text: str, early: _KnownPattern | None, late: _KnownPattern | None, counts: Counter) -> str:
    pieces: list[str] = []
    last = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        pieces.append(_redact_segment(text[last : match.start()], early, late, counts))
        pieces.append(match.group())
        last = match.end()
    pieces.append(_redact_segment(text[last:], early, late, counts))
    return _DOUBLE_WRAPPED_RE.sub(r"\1", "".join(pieces))


def redact(text: str, customer: CustomerFields | None = None) -> Redacted:
    """Replace personal data in ``text`` with typed placeholders and count them by type.

    A replacement can expose a new match next to it (text joined around a
    placeholder), so the pass repeats until the text is stable; two passes
    almost always suffice, and four is a hard stop. ``residual`` says what is
    still there afterwards (as :func:`find_pii` would), so a caller can drop the
    text without scanning it again.
    """
    early, late = _known_patterns(customer) if customer is not None else (None, None)
    counts: Counter = Counter()
    residual: Counter = Counter()
    current = text
    for attempt in range(_MAX_PASSES):
        # A pass that changes nothing found nothing: its text is what find_pii would
        # check, so that check is already done. Only the last pass's finds are residual.
        found: Counter = Counter()
        result = _redact_once(current, early, late, found)
        counts.update(found)
        if result == current:
            break
        current = result
        if attempt == _MAX_PASSES - 1:
            _redact_once(current, early, late, residual)
    obfuscated = _obfuscated_emails(current)
    if obfuscated:
        residual[EMAIL] += obfuscated
    return Redacted(text=current, counts=counts, residual=+residual)


def find_pii(text: str, customer: CustomerFields | None = None) -> Counter:
    """Personal data still present in ``text``, counted by type (never the values themselves).

    Run after :func:`redact`: anything found means the example is not safe to write.
    It re-runs every detector and the customer's known values on the redacted text,
    and also looks for obfuscated e-mail addresses, which redaction deliberately
    does not rewrite (guessing where "jane at example dot com" starts and ends
    is not safe; dropping the example is).
    """
    found: Counter = Counter()
    early, late = _known_patterns(customer) if customer is not None else (None, None)
    for segment in _PLACEHOLDER_RE.split(text):
        if segment:
            _redact_segment(segment, early, late, found)
            found[EMAIL] += _obfuscated_emails(segment)
    return +found  # drops zero counts
