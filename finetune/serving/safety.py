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

**The reply pipeline** (``ReplyPipeline``, run by ``SafeEngine`` for every reply), in
this order:

1. the engine's text goes through ``RepetitionGuard`` (``finetune.serving.repetition``):
   a reply that repeats itself is cut there, the engine is told to stop, and the
   reply is marked (``GenerationDone.cut_reason``);
2. with a reply policy (a grounded version, ``ReplyPlan.decide``), the model's words are
   held until its first generated sentence is complete; the policy then decides whether
   they go out or a retrieved exchange's answer goes out instead (the engine is
   stopped; ``GenerationDone.source == "retrieved"``), or a person should take over;
3. ``StreamFilter``: personal data and blocked terms are masked;
4. ``PlaceholderFiller`` (``finetune.serving.placeholders``) fills ``{{…}}``/``[…]`` slots
   from the company's facts and this conversation's customer values, after the masker
   on purpose: the company's phone and the customer's own order number are put in by
   the server and must not be masked as personal data. A slot nobody can fill gets
   neutral words in the reply's language: that of the reply's own text before the slot
   when it is long enough to tell, else the conversation's (``GenerationRequest.language``,
   the label stored with the customer's latest message; detected from the request's
   customer turns when the caller gives none).

Each stage releases text as soon as it can no longer change, so the reply still
streams, a sentence or a few words behind the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune.ml.redaction import UNSPACED_LETTERS, redact
from finetune.ml.reply_policy import first_model_sentence, has_words
from finetune.ml.segments import UNDETERMINED_LANGUAGE

from .interface import Engine, GenerationDone, GenerationRequest, TokenDelta
from .placeholders import PlaceholderFiller, customer_values, reply_language
from .repetition import RepetitionGuard, cut_repetition

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


@dataclass
class ReplyPlan:
    """What the pipeline needs for one reply; ``SafeEngine``'s ``plan_for`` prepares it (the runtime does).

    ``decide(model_text, mean_logprob, partial=...)`` is the reply policy
    (``finetune.ml.reply_policy.choose_reply`` bound to this reply's retrieval hits); it
    returns a choice with ``source`` ("model", "retrieved", "handoff"), ``text``,
    ``reason``, ``origin``, ``intent``, ``score`` and ``to_json()``. None: the model's
    reply goes out (a version without a retrieval index, served as before grounding).
    """

    maskers: list[Masker]
    facts: Mapping[str, str] = field(default_factory=dict)  # the company's (bot profile)
    values: Mapping[str, str] | None = None  # the customer's; None: found in the request's customer turns
    messages: list[dict[str, str]] | None = None  # the grounded conversation, sent instead of the request's
    prime: str = ""  # how the reply starts (``GenerationRequest.prime``)
    grounding: list[dict[str, Any]] = field(default_factory=list)  # the exchanges used, logged with the reply
    decide: Callable[..., Any] | None = None


_SOURCE_MODEL, _SOURCE_RETRIEVED, _SOURCE_HANDOFF = "model", "retrieved", "handoff"


class ReplyPipeline:
    """One reply's text from the engine to the customer: guard, reply policy, masks, slots (module docstring).

    ``push(delta, mean_logprob)`` returns the text to send now; ``stop_engine`` turns
    True when the engine should stop (a repetition, or a retrieved answer chosen);
    ``finish(done)`` returns the rest and ``done_event(done, ...)`` the final event.
    ``language`` is the conversation's (ISO 639-1) for the filler's neutral words; None or
    "": found from ``messages`` (``placeholders.reply_language``).
    """

    def __init__(self, plan: ReplyPlan, messages: Iterable[Mapping[str, str]], language: str | None = None):
        self.plan = plan
        self.guard = RepetitionGuard()
        self.filter = StreamFilter(plan.maskers)
        messages = list(messages)
        values = plan.values if plan.values is not None else customer_values(messages)
        self.language = reply_language(messages, language)
        self.filler = PlaceholderFiller(plan.facts, values, self.language)
        self.prime = (plan.prime or "").strip()
        self.held = ""  # guard output waiting for the policy's decision
        self.choice = None
        self.silenced = False  # the policy handed off a reply without words: none of it is shown
        self.mean_logprob: float | None = None
        self.stop_engine = False

    @property
    def deciding(self) -> bool:
        return self.plan.decide is not None and self.choice is None

    def push(self, delta: str, mean_logprob: float | None = None) -> str:
        if mean_logprob is not None:
            self.mean_logprob = mean_logprob
        if self._retrieved or self.silenced:
            return ""  # the model's words no longer matter
        released = self.guard.push(delta)
        if self.guard.cut:
            self.stop_engine = True
        if not self.deciding:
            return self._out(released)
        self.held += released
        first = self._first_sentence(cut_repetition(self.guard.raw).text)
        if first is None and not self.guard.cut:
            return ""
        return self._decide(first if first is not None else self.guard.text, partial=not self.guard.cut)

    def finish(self, done: GenerationDone) -> str:
        """The rest of the reply once the engine's stream ended with ``done``."""
        if self._retrieved or self.silenced:
            return ""
        if done.mean_logprob is not None:
            self.mean_logprob = done.mean_logprob  # also counts tokens that added no text (the end token)
        rest = self.guard.finish()
        out = ""
        if self.deciding and (done.finish_reason in ("stop", "length", "cancelled") and self.guard.text.strip()):
            self.held += rest
            out = self._decide(self.guard.text, partial=False)
        else:
            held, self.held = self.held + rest, ""
            out = self._out(held)
        if self._retrieved or self.silenced:
            return out
        return out + self.filler.push(self.filter.flush()) + self.filler.flush()

    def done_event(self, done: GenerationDone, *, stopped_by_pipeline: bool, grounding: list) -> GenerationDone:
        reason = done.finish_reason
        if stopped_by_pipeline and reason == "cancelled":
            reason = "stop"  # the pipeline stopped a finished reply (a repetition, a retrieved answer)
        choice = self.choice
        retrieved = self._retrieved
        return dataclasses.replace(
            done,
            text=self.filler.text,
            finish_reason=reason,
            cut_reason=self.guard.reason if self.guard.cut and not retrieved else "",
            source=_SOURCE_RETRIEVED if retrieved else _SOURCE_MODEL,
            source_origin=choice.origin if retrieved else "",
            policy={k: v for k, v in choice.to_json().items() if k != "text"} if choice is not None else {},
            grounding=list(grounding),
            handoff=choice is not None and choice.source == _SOURCE_HANDOFF,
        )

    @property
    def _retrieved(self) -> bool:
        return self.choice is not None and self.choice.source == _SOURCE_RETRIEVED

    def _first_sentence(self, text: str) -> str | None:
        """The text up to the end of the first sentence the model wrote after the prime; None until complete."""
        return first_model_sentence(text, self.prime)

    def _decide(self, model_text: str, *, partial: bool) -> str:
        self.choice = self.plan.decide(model_text.strip(), self.mean_logprob, partial=partial)
        if self.choice.source == _SOURCE_HANDOFF and not has_words(model_text):
            # Emoji or symbols only: shown, it would answer nobody; the reply ends empty (the
            # customer sees that the assistant could not answer) and a human takes over.
            self.silenced = self.stop_engine = True
            self.held = ""
            return ""
        if self._retrieved:
            self.stop_engine = True
            self.held = ""
            masked = self.filter.push(self.choice.text) + self.filter.flush()
            return self.filler.push(masked) + self.filler.flush()
        held, self.held = self.held, ""
        return self._out(held)

    def _out(self, text: str) -> str:
        if not text:
            return ""
        masked = self.filter.push(text)
        return self.filler.push(masked) if masked else ""


class SafeEngine:
    """An ``Engine`` whose every stream passes the reply pipeline; otherwise the wrapped engine.

    ``plan_for(request)`` gives one reply's ``ReplyPlan`` (the runtime reads the bot
    profile's blocked terms and facts, and grounds the request on the version's
    retrieval index); ``maskers_for(request)`` is the older, maskers-only form. Without
    either, ``reply_maskers()`` applies and no slot has a company fact.
    """

    def __init__(
        self,
        engine: Engine,
        maskers_for: Callable[[GenerationRequest], Awaitable[list[Masker]]] | None = None,
        *,
        plan_for: Callable[[GenerationRequest], Awaitable[ReplyPlan]] | None = None,
    ):
        self.inner = engine
        self._maskers_for = maskers_for
        self._plan_for = plan_for

    @property
    def model_label(self) -> str | None:
        return self.inner.model_label

    async def cancel(self, request_id: str) -> None:
        await self.inner.cancel(request_id)

    async def _plan(self, request: GenerationRequest) -> ReplyPlan:
        if self._plan_for is not None:
            return await self._plan_for(request)
        maskers = await self._maskers_for(request) if self._maskers_for else reply_maskers()
        return ReplyPlan(maskers=maskers)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationDone]:
        plan = await self._plan(request)
        language = request.language
        if not language or language == UNDETERMINED_LANGUAGE:
            # Detection reads word lists the first time it runs: off the event loop.
            language = await asyncio.to_thread(reply_language, request.messages, language)
        pipeline = ReplyPipeline(plan, request.messages, language)
        inner_request = request
        if plan.messages is not None or plan.prime:
            inner_request = dataclasses.replace(
                request, messages=plan.messages if plan.messages is not None else request.messages, prime=plan.prime
            )
        stopped = False
        # aclosing: when the reader stops early, the engine's stream is closed at once and
        # stops generating, instead of whenever the garbage collector gets to it.
        async with contextlib.aclosing(self.inner.stream(inner_request)) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    text = pipeline.push(event.text, event.mean_logprob)
                    if pipeline.stop_engine and not stopped:
                        stopped = True
                        await self.inner.cancel(inner_request.request_id)
                    if text:
                        yield TokenDelta(text, mean_logprob=event.mean_logprob)
                    continue
                tail = pipeline.finish(event)
                if tail:
                    yield TokenDelta(tail)
                yield pipeline.done_event(event, stopped_by_pipeline=stopped, grounding=plan.grounding)
                return
