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
redact(t)``. :func:`find_pii` checks a text afterwards: the same detectors plus
looser ones (obfuscated e-mails such as ``jane [at] example [dot] com``, which are
not rewritten because where they start and end is guesswork). ``redact`` returns
what find_pii would report on its result as ``residual`` (its last, unchanged pass
already ran those detectors), and the dataset builder drops any example with a
residual.

    >>> redact("Mail me at jane@example.com").text
    'Mail me at {{EMAIL}}'

Why one module of ~600 lines: ``redact`` and ``find_pii`` must use the very same
detectors (patterns, validators, the customer-field matchers), so they live together.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
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

# Letters of scripts written without spaces between words (Thai, Lao, Myanmar, Khmer,
# kana, CJK ideographs) and Hangul, whose particles attach to the word before them:
# text in them runs straight into an address or a term, with no \b in between.
UNSPACED_LETTERS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
)

# Local part and domain use \w so non-ASCII addresses ("jörg@beispiel.de") are found too.
_EMAIL_RE = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
# \w also takes in Chinese written right up to an ASCII address ("请发到jane@x.com谢谢"):
# such a run before an ASCII local part, or after an ASCII top-level domain, is text.
_EMAIL_GLUED_HEAD_RE = re.compile(rf"^[{UNSPACED_LETTERS}]+(?=[A-Za-z0-9._%+-]+@)")
_EMAIL_GLUED_TAIL_RE = re.compile(rf"(?<=[A-Za-z])[{UNSPACED_LETTERS}]+$")
# Written to dodge filters: "jane [at] example [dot] com", "jane(at)example.com". Only
# find_pii looks for these; an example containing one is dropped rather than guessed at.
_AT = r"(?:\[at\]|\(at\)|\{at\}|<at>)"
_DOT = r"(?:\[dot\]|\(dot\)|\{dot\}|<dot>)"
_TLD = r"(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|be|ch|at|eu|info|biz|me)(?![A-Za-z0-9_])"
# Matched from the "at" outwards (a pattern starting with the local part would be
# tried at every position of every text, which made it the slowest detector).
_OBFUSCATED_AT_RE = re.compile(rf"(?i)(?<=[\w.+-])(?:\s*{_AT}\s*|\s+at\s+)(?=[\w-])")
_OBFUSCATED_DOMAIN_RE = re.compile(rf"(?i)[\w-]+(?:\s*(?:{_DOT}|\.)\s*[\w-]+)*?\s*(?:{_DOT}|\.)\s*{_TLD}")
# After a plain " at ", the dot must be spelled out too: "look at example.com" is no address.
_OBFUSCATED_SPOKEN_DOMAIN_RE = re.compile(rf"(?i)[\w-]+(?:\s+dot\s+[\w-]+)*?\s+dot\s+{_TLD}")
# No boundary before the scheme: a URL glued to other text ("您好https://…", "Linkhttps://…")
# is still a URL, and only URLs carrying secrets are rewritten, so over-matching costs nothing.
_URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"'`{}|\\^]+", re.IGNORECASE)
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
# Lookarounds name ASCII letters and digits, not \w: Chinese or Japanese text runs
# straight into a number ("请拨打138-1234-5678联系我们"), and \w would hide it.
_CARD_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"\d{4}(?P<s1>[ -]?)\d{4}(?P=s1)\d{4}(?P=s1)\d{4}(?:(?P=s1)\d{1,3})?"  # 16 (Visa, MC), up to 19
    r"|\d{4}(?P<s2>[ -]?)\d{6}(?P=s2)\d{4,5}"  # 14-15 (Amex, Diners)
    r"|\d{13,19}"
    r")(?![A-Za-z0-9_-])"
)
_PHONE_RE = re.compile(r"(?<![A-Za-z0-9_+#])(?:\+|(?<![A-Za-z0-9_])00)?\(?\d[\d ().\-]{5,22}\d(?![A-Za-z0-9_])")
# Seven digits with at most two separator characters between each ("(555) 123-4567"):
# every card, IBAN, phone and long number contains such a run; most support text does not.
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
_WORD_SEP = " \t\r\n\f\v,"  # what may stand between the words of a known name or address
# Characters that may not touch a known value: it would be part of a longer word,
# address or number ("xjane@example.com").
_NOT_BEFORE = "_@+#"
_NOT_AFTER = "_@"


@dataclass(frozen=True)
class _Value:
    """One known value to look for: its words in order, how to compare them, its placeholder."""

    kind: str
    words: tuple[str, ...]  # lower-cased unless case_sensitive
    case_sensitive: bool = False
    hash_prefix: bool = False  # an identifier may be written with a leading "#"


@dataclass(frozen=True)
class _Known:
    """The customer's values, prepared once per customer: plain string search, no regex to compile.

    Compiling a regex per customer cost about a millisecond per ticket, more than all
    the rest of redaction, and nearly every ticket has a different customer.
    """

    early: tuple[_Value, ...]  # matched before the generic detectors
    late: tuple[_Value, ...]  # names, matched after them ("jane.doe@…" must become one {{EMAIL}})
    phone_variants: frozenset[str]  # digit strings the customer's phone number may be written as


def _words(value: str) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[\s,]+", value) if w)


@lru_cache(maxsize=1024)
def _prepare_known(customer: CustomerFields) -> _Known:
    early: list[_Value] = []
    if customer.email:
        early.append(_Value(EMAIL, (customer.email.lower(),)))
    if customer.address:
        early.append(_Value(ADDRESS, _words(customer.address.lower())))
        for part in re.split(r"[,\n;]+", customer.address):
            part = part.strip()
            # A street line or a postcode + town carries a digit; a bare town or country does not identify.
            if len(part) >= 5 and any(c.isdigit() for c in part) and part != customer.address:
                early.append(_Value(ADDRESS, _words(part.lower())))
    for kind, value in customer.identifiers:
        bare = value.lstrip("#")
        if len(bare) >= 4:  # shorter "numbers" (e.g. "12") match too much ordinary text
            early.append(_Value(kind, (bare.lower(),), hash_prefix=True))
    late: list[_Value] = []
    if customer.name:
        late.append(_Value(NAME, _words(customer.name.lower())))
        for part in _words(customer.name):
            stripped = part.strip(".")
            if len(stripped) >= 3 and stripped.lower() not in _HONORIFICS:
                # Case-sensitive: a customer called "Will" or "Bill" should not eat "will" or "bill".
                late.append(_Value(NAME, (stripped,), case_sensitive=True))
    variants: set[str] = set()
    digits = re.sub(r"\D", "", customer.phone)
    if len(digits) >= 7:
        variants.add(digits)
        if len(digits) > 10:
            # "+44 20 7946 0958" is also written "020 7946 0958" or "+44 (0)20 7946 0958".
            country, national = digits[:-10], digits[-10:]
            variants |= {national, "0" + national, country + "0" + national}
            variants |= {"00" + v for v in (country + national, country + "0" + national)}
    return _Known(early=tuple(early), late=tuple(late), phone_variants=frozenset(variants))


def _lower_aligned(text: str) -> str:
    """``text.lower()`` with one character per character, so positions match the original."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower()[:1] or c for c in text)  # "İ".lower() is two characters


def _free_before(haystack: str, index: int) -> bool:
    return index == 0 or not (haystack[index - 1].isalnum() or haystack[index - 1] in _NOT_BEFORE)


def _value_spans(text: str, lowered: str, value: _Value) -> Iterator[tuple[int, int]]:
    haystack = text if value.case_sensitive else lowered
    first, rest = value.words[0], value.words[1:]
    position = haystack.find(first)
    while position != -1:
        start, end = position, position + len(first)
        if value.hash_prefix and start > 0 and haystack[start - 1] == "#":
            start -= 1
        ok = _free_before(haystack, start)
        for word in rest:
            if not ok:
                break
            gap = end
            while gap < len(haystack) and haystack[gap] in _WORD_SEP:
                gap += 1
            ok = gap > end and haystack.startswith(word, gap)
            end = gap + len(word)
        if ok and (end == len(haystack) or not (haystack[end].isalnum() or haystack[end] in _NOT_AFTER)):
            yield start, end
        position = haystack.find(first, position + 1)


def _phone_spans(text: str, variants: frozenset[str]) -> Iterator[tuple[int, int]]:
    """Spans of ``text`` whose digits spell the customer's phone number, however it is grouped."""
    if not variants:
        return
    for candidate in _PHONE_RE.finditer(text):
        groups = [
            (g.start(), g.end(), re.sub(r"\D", "", g.group())) for g in _PHONE_TOKEN_RE.finditer(candidate.group())
        ]
        i = 0
        while i < len(groups):
            digits, best = "", None
            for j in range(i, len(groups)):
                digits += groups[j][2]
                if digits in variants:
                    best = j
            if best is None:
                i += 1
                continue
            yield candidate.start() + groups[i][0], candidate.start() + groups[best][1]
            i = best + 1


def _sub_known(values: tuple[_Value, ...], text: str, counts: Counter, phones: frozenset[str] = frozenset()) -> str:
    """Replace every occurrence of the customer's known values in ``text``."""
    lowered = _lower_aligned(text)
    spans: list[tuple[int, int, str]] = []
    for value in values:
        spans.extend((start, end, value.kind) for start, end in _value_spans(text, lowered, value))
    if phones and _DIGIT_RUN_RE.search(text):
        spans.extend((start, end, PHONE) for start, end in _phone_spans(text, phones))
    if not spans:
        return text
    # Leftmost first, then longest: a full address wins over one of its lines.
    spans.sort(key=lambda span: (span[0], span[0] - span[1]))
    pieces: list[str] = []
    last = 0
    for start, end, kind in spans:
        if start < last:
            continue
        pieces += [text[last:start], placeholder(kind)]
        counts[kind] += 1
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


# --- redaction ----------------------------------------------------------------------------


_MAX_PASSES = 4  # redaction passes before giving up on a text that keeps changing


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


def _sub_emails(text: str, counts: Counter) -> str:
    def replace(match: re.Match) -> str:
        address = match.group()
        head = _EMAIL_GLUED_HEAD_RE.match(address)
        head_text = head.group() if head else ""
        tail = _EMAIL_GLUED_TAIL_RE.search(address)
        tail_text = tail.group() if tail else ""
        core = address[len(head_text) : len(address) - len(tail_text)]
        if not _EMAIL_RE.fullmatch(core):
            head_text = tail_text = ""  # not an ASCII address glued to text: mask it all
        counts[EMAIL] += 1
        return head_text + placeholder(EMAIL) + tail_text

    return _EMAIL_RE.sub(replace, text)


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


def _redact_segment(text: str, known: _Known | None, counts: Counter) -> str:
    if known is not None:
        text = _sub_known(known.early, text, counts, known.phone_variants)
    # Cheap tests first: most support text has no "@", no URL and no long digit run, and
    # skipping a detector that cannot match is most of the speed of a dataset build.
    if _URL_HINT_RE.search(text):
        text = _sub_urls(text, counts)
    if "@" in text:
        text = _sub_emails(text, counts)
    if _DIGIT_RUN_RE.search(text):
        text = _sub(_IBAN_RE, IBAN, text, counts, _iban_ok)
        text = _sub(_CARD_RE, CARD, text, counts, _card_ok)
        text = _sub_phones(text, counts)
        text = _sub(_NUMBER_RE, NUMBER, text, counts)
    return _sub_known(known.late, text, counts) if known is not None else text


def _obfuscated_emails(text: str) -> int:
    """How many e-mail addresses written to dodge filters ("jane [at] example [dot] com") ``text`` holds."""
    found = 0
    for at in _OBFUSCATED_AT_RE.finditer(text):
        spoken = "at" == at.group().strip().lower()
        domain = _OBFUSCATED_SPOKEN_DOMAIN_RE if spoken else _OBFUSCATED_DOMAIN_RE
        if domain.match(text, at.end()):
            found += 1
    return found


def _redact_once(text: str, known: _Known | None, counts: Counter) -> str:
    pieces: list[str] = []
    last = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        pieces.append(_redact_segment(text[last : match.start()], known, counts))
        pieces.append(match.group())
        last = match.end()
    pieces.append(_redact_segment(text[last:], known, counts))
    return _DOUBLE_WRAPPED_RE.sub(r"\1", "".join(pieces))


def redact(text: str, customer: CustomerFields | None = None) -> Redacted:
    """Replace personal data in ``text`` with typed placeholders and count them by type.

    A replacement can expose a new match next to it (text joined around a
    placeholder), so the pass repeats until the text is stable; two passes
    almost always suffice, and four is a hard stop. ``residual`` says what is
    still there afterwards (as :func:`find_pii` would), so a caller can drop the
    text without scanning it again.
    """
    known = _prepare_known(customer) if customer is not None and not customer.is_empty() else None
    counts: Counter = Counter()
    residual: Counter = Counter()
    current = text
    for attempt in range(_MAX_PASSES):
        # A pass that changes nothing found nothing: its text is what find_pii would
        # check, so that check is already done. Only the last pass's finds are residual.
        found: Counter = Counter()
        result = _redact_once(current, known, found)
        counts.update(found)
        if result == current:
            break
        current = result
        if attempt == _MAX_PASSES - 1:
            _redact_once(current, known, residual)
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
    known = _prepare_known(customer) if customer is not None and not customer.is_empty() else None
    for segment in _PLACEHOLDER_RE.split(text):
        if segment:
            _redact_segment(segment, known, found)
            found[EMAIL] += _obfuscated_emails(segment)
    return +found  # drops zero counts
