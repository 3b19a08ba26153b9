"""The safety filter every bot reply passes before it leaves the server.

It masks personal data (e-mail addresses, phone, card and account numbers, IBANs,
URLs with secrets) and the bot profile's blocked terms in generated text.

**Streaming.** Replies are streamed token by token, so the filter holds text back
until it can no longer become part of a match: a streamed e-mail address or card
number is never sent half-unmasked. ``StreamFilter.push(delta)`` returns the text
that is final; ``flush()`` returns the rest when the reply ends. Text is committed
only up to a whitespace character, in segments that each masker sees whole, so the
concatenated output is exactly the filtered reply (``StreamFilter.text``). Chinese and
Japanese are written without spaces, so there the punctuation of those scripts
("，", "。", "、", fullwidth "！"…) also ends a segment, except inside a run that holds
a URL (the URL pattern runs to the next whitespace).

**Maskers.** A ``Masker`` is a function ``str -> str`` plus a hold-back rule: how
many characters at the end of the not-yet-sent text might still grow into a match.
The personal-data masker uses ``finetune.ml.redaction.redact`` (the same detectors
that clean the training data). ``blocked_terms_masker(terms)`` masks the admin's
blocked terms. Other issues (bias) add process-wide maskers with
``register_masker``.

**Where it runs.** ``SafeEngine`` wraps an engine: what ``finetune.serving.runtime.get_engine()``
returns is already wrapped, so a consumer iterating ``engine.stream(request)`` only
ever receives filtered ``TokenDelta``\\s and a ``GenerationDone`` whose ``text`` is
the filtered reply. Plain Python: the blocked terms come from a provider the caller
passes (the inference glue reads the ``BotProfile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from finetune.ml.redaction import UNSPACED_LETTERS, redact

from .interface import Engine, GenerationDone, GenerationRequest, TokenDelta

BLOCKED_MASK = "***"


@dataclass(frozen=True)
class Masker:
    """A masking pass over text, with the rule that keeps streaming from leaking a partial match.

    ``hold_back(pending)`` gets the text not sent yet and returns how many characters
    at its end must wait for more text (0 when nothing there could grow into a match).
    The filter additionally never sends the last, possibly unfinished, word.
    """

    name: str
    mask: Callable[[str], str]
    hold_back: Callable[[str], int]


# --- hold-back rules -------------------------------------------------------------------


def is_unspaced_break(ch: str) -> bool:
    """Punctuation of scripts written without spaces (CJK symbols, fullwidth forms).

    None of the personal-data patterns can run across one (they are ASCII digits,
    letters and ASCII punctuation), except a URL, which runs to the next whitespace.
    """
    cp = ord(ch)
    return (
        0x3001 <= cp <= 0x303F  # 、。〈〉《》「」『』【】〜 …
        or 0xFF01 <= cp <= 0xFF0F  # ！＂＃＄％＆＇（）＊＋，－．／
        or 0xFF1A <= cp <= 0xFF20  # ：；＜＝＞？＠
        or 0xFF3B <= cp <= 0xFF40  # ［＼］＾＿｀
        or 0xFF5B <= cp <= 0xFF65  # ｛｜｝～ and halfwidth ｡｢｣､･
    )


def _is_gap(ch: str) -> bool:
    return ch.isspace() or is_unspaced_break(ch)


# A word that contains a digit, or punctuation that starts or joins a number ("+", "(",
# "-"): part of a number written in groups ("4111 1111 …", "+44 20 7946 0958",
# "DE89 3704 0044 …", "(555) 123-4567").
_NUMBER_WORD_RE = re.compile(r"\S*\d\S*|[+()\-./]+")


def number_tail(pending: str) -> int:
    """The trailing run of number-like words (and the spaces or CJK punctuation between them).

    Such a run may be the beginning of a phone, card or account number or an IBAN
    whose next group has not been generated yet, so none of it is sent. The last word,
    when unfinished, counts as number-like: it may still turn into one.
    """
    end = len(pending)
    start = position = end
    unfinished = bool(pending) and not _is_gap(pending[-1])
    while position > 0:
        word_end = position
        while word_end > 0 and _is_gap(pending[word_end - 1]):
            word_end -= 1
        word_start = word_end
        while word_start > 0 and not _is_gap(pending[word_start - 1]):
            word_start -= 1
        if word_start == word_end:
            break
        if not (unfinished or _NUMBER_WORD_RE.fullmatch(pending[word_start:word_end])):
            break
        unfinished = False
        start = position = word_start
    # Only a run with a digit in it can be a number; otherwise just the unfinished word waits.
    run = pending[start:end]
    if not any(c.isdigit() for c in run):
        return 0
    return end - start


def term_prefix_tail(terms: Iterable[str]) -> Callable[[str], int]:
    """A rule holding back the end of the text that is the start of one of ``terms``.

    Terms match whole words (except at an edge written in a script without spaces),
    case-insensitively, with any whitespace between their words, so the rule does too.
    A whole term at the very end is held as well: the next character may make it part
    of a longer word ("ass" in "assist"), which is not masked.
    """
    patterns = []
    for term in terms:
        atoms = [
            atom for i, word in enumerate(term.split()) for atom in ([r"\s+"] if i else []) + list(map(re.escape, word))
        ]
        if not atoms:
            continue
        nested = ""
        for atom in reversed(atoms[1:]):
            nested = f"(?:{atom}{nested})?"
        patterns.append(_term_start(term) + atoms[0] + nested)
    if not patterns:
        return lambda pending: 0
    # The leftmost start from which a term prefix runs to the end is the longest such end.
    tail = re.compile(rf"(?:{'|'.join(patterns)})\Z", re.IGNORECASE)

    def hold_back(pending: str) -> int:
        match = tail.search(pending)
        return len(pending) - match.start() if match else 0

    return hold_back


# --- maskers -----------------------------------------------------------------------------


def pii_masker() -> Masker:
    """Personal-data masking with ``finetune.ml.redaction.redact``, the training data's detectors."""
    return Masker(name="pii", mask=lambda text: redact(text).text, hold_back=number_tail)


_UNSPACED_LETTER_RE = re.compile(f"[{UNSPACED_LETTERS}]")


def _term_start(term: str) -> str:
    """Whole words only, except at an edge of a term in a script without spaces ("免费" in "这是免费的")."""
    return "" if _UNSPACED_LETTER_RE.match(term[0]) else r"(?<!\w)"


def _term_end(term: str) -> str:
    return "" if _UNSPACED_LETTER_RE.match(term[-1]) else r"(?!\w)"


def blocked_terms_masker(terms: Iterable[str]) -> Masker | None:
    """Mask each term (case-insensitive, whole words, any whitespace inside); None when there are none.

    An edge of a term written in a script without spaces (Chinese, Japanese, Thai, ...)
    matches inside a word, since such text has no word boundaries to match.
    """
    cleaned = sorted({" ".join(term.split()) for term in terms if term and term.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    alternatives = "|".join(
        _term_start(term) + r"\s+".join(re.escape(word) for word in term.split()) + _term_end(term) for term in cleaned
    )
    pattern = re.compile(f"(?:{alternatives})", re.IGNORECASE)
    return Masker(
        name="blocked-terms", mask=lambda text: pattern.sub(BLOCKED_MASK, text), hold_back=term_prefix_tail(cleaned)
    )


def parse_blocked_terms(text: str) -> list[str]:
    """The ``BotProfile.blocked_terms`` field: one term per line, blank lines ignored."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


_registered: list[Masker] = []


def register_masker(masker: Masker) -> None:
    """Add a masker applied to every reply of this process (after personal data, before blocked terms)."""
    if all(existing.name != masker.name for existing in _registered):
        _registered.append(masker)


def unregister_masker(name: str) -> None:
    _registered[:] = [masker for masker in _registered if masker.name != name]


def reply_maskers(blocked_terms: Iterable[str] = ()) -> list[Masker]:
    """The maskers for one reply: personal data, registered extras, then the blocked terms."""
    maskers = [pii_masker(), *_registered]
    blocked = blocked_terms_masker(blocked_terms)
    if blocked is not None:
        maskers.append(blocked)
    return maskers


def mask_text(text: str, maskers: Iterable[Masker]) -> str:
    for masker in maskers:
        text = masker.mask(text)
    return text


# --- streaming -----------------------------------------------------------------------------

# The start of a URL (finetune.ml.redaction's URL pattern): "http://", "https://" or "www.".
_URL_HINT_RE = re.compile(r"(?i)://|www\.")


class StreamFilter:
    """Masks a reply that arrives in pieces, sending only text that can no longer change."""

    def __init__(self, maskers: Iterable[Masker]):
        self.maskers = list(maskers)
        self.pending = ""  # raw text received and not sent yet
        self.sent: list[str] = []  # filtered segments returned so far

    def push(self, delta: str) -> str:
        self.pending += delta
        hold = max((masker.hold_back(self.pending) for masker in self.maskers), default=0)
        cut = self._word_start_at_or_before(len(self.pending) - hold)
        whole = None
        while cut > 0:
            head, rest = self.pending[:cut], self.pending[cut:]
            masked_head = mask_text(head, self.maskers)
            whole = whole if whole is not None else mask_text(self.pending, self.maskers)
            # Commit only where cutting changes nothing: a complete match ("free money!")
            # must not be split between two segments and escape both.
            if masked_head + mask_text(rest, self.maskers) == whole:
                self.pending = rest
                self.sent.append(masked_head)
                return masked_head
            cut = self._word_start_at_or_before(cut - 1)
        return ""

    def _word_start_at_or_before(self, cut: int) -> int:
        """The last position <= ``cut`` right after whitespace, or after CJK punctuation (0 if none).

        The unfinished last word is never sent, and every segment starts at a word, so
        word-boundary rules see in a segment what they would see in the whole reply.
        After CJK punctuation the same holds when at least one character follows it and
        no URL runs through it (a URL continues to the next whitespace).
        """
        pending = self.pending
        while cut > 0:
            before = pending[cut - 1]
            if before.isspace():
                return cut
            if is_unspaced_break(before) and cut < len(pending):
                run_start = cut - 1
                while run_start > 0 and not pending[run_start - 1].isspace():
                    run_start -= 1
                if not _URL_HINT_RE.search(pending, run_start, cut):
                    return cut
            cut -= 1
        return 0

    def flush(self) -> str:
        """The rest of the reply, masked: call once when generation has ended."""
        segment, self.pending = self.pending, ""
        return self._emit(segment) if segment else ""

    @property
    def text(self) -> str:
        """Everything returned so far: the filtered reply once ``flush`` was called."""
        return "".join(self.sent)

    def _emit(self, segment: str) -> str:
        masked = mask_text(segment, self.maskers)
        self.sent.append(masked)
        return masked


class SafeEngine:
    """An ``Engine`` whose every stream passes the safety filter; otherwise the wrapped engine.

    ``maskers_for(request)`` gives the maskers of one reply (the inference glue adds the
    bot profile's blocked terms); without it, ``reply_maskers()`` applies.
    """

    def __init__(
        self, engine: Engine, maskers_for: Callable[[GenerationRequest], Awaitable[list[Masker]]] | None = None
    ):
        self.inner = engine
        self._maskers_for = maskers_for

    @property
    def model_label(self) -> str | None:
        return self.inner.model_label

    async def cancel(self, request_id: str) -> None:
        await self.inner.cancel(request_id)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        maskers = await self._maskers_for(request) if self._maskers_for else reply_maskers()
        flt = StreamFilter(maskers)
        # aclosing: when the reader stops early, the engine's stream is closed at once and
        # stops generating, instead of whenever the garbage collector gets to it.
        async with contextlib.aclosing(self.inner.stream(request)) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    text = flt.push(event.text)
                    if text:
                        yield TokenDelta(text)
                    continue
                tail = flt.flush()
                if tail:
                    yield TokenDelta(tail)
                yield dataclasses.replace(event, text=flt.text)
                return
