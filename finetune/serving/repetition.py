"""Find where a reply starts repeating itself, and cut it there.

Decoding controls (``finetune.ml.decoding``) make loops rare; this is the net under
them. A reply is cut at:

- the first sentence that repeats an earlier one (same words, ignoring case, spacing
  and punctuation; sentences of fewer than ``min_sentence_words`` words, such as list
  numbers, never count), or
- the first word run that loops: the same block of 1-8 words three times in a row
  ("de l'adresse de l'adresse de l'adresse"), or
- the second occurrence of any ``ngram``-word run (a paragraph said twice).

On the Bitext agents' own 3,651 replies this fires once, on a broken row that glues
two replies together (with 10-word runs it fired on three; docs/quality-research.md),
so a cut is a model fault, not a style. ``cut_repetition`` works on a whole reply;
``RepetitionGuard`` on a stream, telling the engine to stop as soon as a loop shows.

    >>> cut_repetition("Sorry for the wait. I can help you with that. I can help you with that.").text
    'Sorry for the wait. I can help you with that.'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_SENTENCE_WORDS = 4
NGRAM = 12  # words; Bitext answers repeat phrases ("on our website"), and two of them a 10-word run
LOOP_REPEATS = 3
LOOP_MAX_BLOCK = 8

# A sentence ends at . ! ? (and CJK 。！？) followed by space, or at a line break.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


@dataclass(frozen=True)
class RepetitionCut:
    text: str  # the reply up to the repetition (the whole reply when nothing repeats)
    cut: bool
    reason: str = ""  # "sentence", "loop" or "ngram" when cut


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD_RE.finditer(text)]


def _sentence_cut(text: str, min_words: int) -> int | None:
    """Offset where the first repeated sentence starts, or None."""
    seen: set[tuple[str, ...]] = set()
    start = 0
    for match in [*_SENTENCE_END_RE.finditer(text), None]:
        end = match.start() if match else len(text)
        words = tuple(w for w, _, _ in _words(text[start:end]))
        if len(words) >= min_words:
            if words in seen:
                return start
            seen.add(words)
        if match is None:
            break
        start = match.end()
    return None


def _loop_cut(words: list[tuple[str, int, int]], repeats: int, max_block: int) -> int | None:
    """Word index where a block of words starts repeating ``repeats`` times in a row, or None."""
    n = len(words)
    for i in range(n):
        for size in range(1, max_block + 1):
            if i + size * repeats > n:
                break
            block = [w for w, _, _ in words[i : i + size]]
            if all(
                [w for w, _, _ in words[i + size * r : i + size * (r + 1)]] == block for r in range(1, repeats)
            ) and (size > 1 or repeats >= 4 or len(block[0]) > 1):
                # Keep the first occurrence; the repeats go.
                return i + size
    return None


def _ngram_cut(words: list[tuple[str, int, int]], size: int) -> int | None:
    """Word index where an earlier ``size``-word run occurs again, or None."""
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - size + 1):
        gram = tuple(w for w, _, _ in words[i : i + size])
        first = seen.get(gram)
        if first is not None and i >= first + size:  # non-overlapping: overlap is a loop, found above
            return i
        seen.setdefault(gram, i)
    return None


def cut_repetition(
    text: str,
    *,
    min_sentence_words: int = MIN_SENTENCE_WORDS,
    ngram: int = NGRAM,
    loop_repeats: int = LOOP_REPEATS,
) -> RepetitionCut:
    """The reply up to its first repetition (see the module docstring)."""
    candidates: list[tuple[int, str]] = []
    at = _sentence_cut(text, min_sentence_words)
    if at is not None:
        candidates.append((at, "sentence"))
    words = _words(text)
    index = _loop_cut(words, loop_repeats, LOOP_MAX_BLOCK)
    if index is not None:
        candidates.append((words[index][1], "loop"))
    index = _ngram_cut(words, ngram)
    if index is not None:
        candidates.append((words[index][1], "ngram"))
    if not candidates:
        return RepetitionCut(text=text, cut=False)
    # The earliest wins; at the same offset a repeated sentence is the plainest name for it.
    priority = {"sentence": 0, "loop": 1, "ngram": 2}
    offset, reason = min(candidates, key=lambda c: (c[0], priority[c[1]]))
    kept = text[:offset].rstrip()
    # A cut inside a sentence leaves a dangling clause; end at the last full sentence when
    # there is one, else keep the words and close them.
    if reason != "sentence":
        ends = [m.start() for m in _SENTENCE_END_RE.finditer(kept)]
        if ends:
            kept = kept[: ends[-1]].rstrip()
        kept = kept.rstrip(" ,;:-")
    return RepetitionCut(text=kept, cut=True, reason=reason)


def has_repetition(text: str) -> bool:
    """Whether the reply repeats a sentence, loops or says a word run twice (the quality measure)."""
    return cut_repetition(text).cut


class RepetitionGuard:
    """Streams a reply through ``cut_repetition``: text is released as soon as no cut can remove it.

    ``push(delta)`` returns the text that is final; when a repetition shows, ``cut``
    turns True and the engine should stop generating. ``finish()`` returns the rest.

    Streaming stays word by word: only text that may turn out to be a repetition waits,
    which is, at the end of what was written so far,

    - the sentence being written while its words are the start of an earlier sentence
      (it may become that sentence again),
    - words that repeat the ones just before them (a loop may be starting), and
    - words that repeat the start of an earlier ``ngram``-word run (a paragraph may be
      said again),

    plus the last, maybe unfinished, word. So a repeated sentence, loop or paragraph is
    never shown. The one difference from ``cut_repetition`` on the whole reply: a loop or
    repeated run that starts inside a sentence ends the reply there (the words before it
    were already shown), where ``cut_repetition`` would go back to the last full sentence.
    """

    def __init__(self, *, min_sentence_words: int = MIN_SENTENCE_WORDS, ngram: int = NGRAM):
        self.min_sentence_words = min_sentence_words
        self.ngram = ngram
        self.raw = ""
        self.sent = 0  # characters of raw released
        self.cut = False
        self.reason = ""
        # What the incremental check has seen (each push looks at new words and sentences only,
        # so a reply costs O(length), not O(length^2)):
        self._checked_words = 0
        self._grams: dict[tuple[str, ...], int] = {}  # ngram-word run -> the word index it first starts at
        self._sentence_ends: list[int] = []  # character offsets where complete sentences end
        self._sentences: list[tuple[str, ...]] = []  # the words of each complete sentence
        self._seen_sentences: set[tuple[str, ...]] = set()
        self._words: list[tuple[str, int, int]] = []  # _words(raw), kept up to date by _update_words

    def push(self, delta: str) -> str:
        if self.cut:
            return ""
        self.raw += delta
        words = self._update_words()
        if self._repeats_now(words):
            result = cut_repetition(self.raw, min_sentence_words=self.min_sentence_words, ngram=self.ngram)
            if result.cut:
                self.cut, self.reason = True, result.reason
                return self._release(len(result.text), final=result.text)
        return self._release(self._safe_end(words))

    def finish(self) -> str:
        """The rest of the reply (cut if it repeats); call once when generation ended."""
        if self.cut:
            return ""
        result = cut_repetition(self.raw, min_sentence_words=self.min_sentence_words, ngram=self.ngram)
        self.cut, self.reason = result.cut, result.reason
        return self._release(len(result.text), final=result.text)

    @property
    def text(self) -> str:
        return self.raw[: self.sent]

    def _update_words(self) -> list[tuple[str, int, int]]:
        """``_words(self.raw)``, scanning only from the last word on (the only one new text can change)."""
        start = self._words.pop()[1] if self._words else 0
        self._words.extend((m.group().lower(), m.start(), m.end()) for m in _WORD_RE.finditer(self.raw, start))
        return self._words

    def _repeats_now(self, words: list[tuple[str, int, int]]) -> bool:
        """Whether the words and sentences completed since the last push make a repetition.

        Only complete words and sentences count here (the whole-reply check at ``finish``
        sees the rest); a True is confirmed by ``cut_repetition``, which places the cut.
        """
        raw = self.raw
        complete = len(words)
        if words and not any(c.isspace() for c in raw[words[-1][2] :]):
            complete -= 1  # the last word may go on
        found = False
        for end in range(self._checked_words + 1, complete + 1):  # runs ending with word end-1
            for size in range(1, LOOP_MAX_BLOCK + 1):
                if end < size * LOOP_REPEATS:
                    break
                block = [w for w, _, _ in words[end - size : end]]
                if (size > 1 or len(block[0]) > 1) and all(
                    [w for w, _, _ in words[end - size * (r + 1) : end - size * r]] == block
                    for r in range(1, LOOP_REPEATS)
                ):
                    found = True
            if end >= self.ngram:
                gram = tuple(w for w, _, _ in words[end - self.ngram : end])
                first = self._grams.setdefault(gram, end - self.ngram)
                if end - self.ngram >= first + self.ngram:
                    found = True
        self._checked_words = max(self._checked_words, complete)
        start = self._sentence_ends[-1] if self._sentence_ends else 0
        for match in _SENTENCE_END_RE.finditer(raw, start):
            if match.end() <= start or match.end() == len(raw):
                continue  # the end of what is written: more of the same line break may follow
            sentence = tuple(w for w, s, _ in words if start <= s < match.start())
            self._sentence_ends.append(match.end())
            if len(sentence) >= self.min_sentence_words:
                self._sentences.append(sentence)
                if sentence in self._seen_sentences:
                    found = True
                self._seen_sentences.add(sentence)
            start = match.end()
        return found

    def _safe_end(self, words: list[tuple[str, int, int]]) -> int:
        """Where the text that may still be cut starts (see the class docstring)."""
        raw = self.raw
        if not words:
            return self.sent
        n = len(words)
        # No space after the last word yet: it may go on ("l'" of "l'adresse", "e-" of "e-mail").
        open_last = not any(c.isspace() for c in raw[words[-1][2] :])

        def same(i: int, j: int) -> bool:
            """Whether word ``j`` (a later one) equals word ``i``; an unfinished last word may still become it."""
            if j == n - 1 and open_last:
                return words[i][0].startswith(words[j][0])
            return words[i][0] == words[j][0]

        hold = words[-1][1] if open_last else len(raw)
        # 1. The sentence being written, while it is the start of an earlier sentence.
        start = self._sentence_ends[-1] if self._sentence_ends else 0
        first = next((i for i in range(n - 1, -1, -1) if words[i][1] < start), -1) + 1
        size = n - first
        if size:
            for sentence in self._sentences:
                if size <= len(sentence) and all(
                    (words[first + k][0] == sentence[k])
                    if first + k != n - 1 or not open_last
                    else sentence[k].startswith(words[first + k][0])
                    for k in range(size)
                ):
                    hold = min(hold, words[first][1])
                    break
        # 2. Words repeating the block of 1..LOOP_MAX_BLOCK words just before them.
        for block in range(1, LOOP_MAX_BLOCK + 1):
            j = n - 1
            while j - block >= 0 and same(j - block, j):
                j -= 1
            if j + 1 < n:
                hold = min(hold, words[j + 1][1])
        # 3. A tail that repeats the start of an earlier, non-overlapping ngram-word run.
        positions: dict[str, list[int]] = {}
        for i, (word, _, _) in enumerate(words):
            positions.setdefault(word, []).append(i)
        for length in range(min(self.ngram - 1, n), 0, -1):
            p = n - length
            if words[p][1] >= hold:
                continue
            if p == n - 1 and open_last:
                starts = [i for i in range(p - self.ngram + 1) if same(i, p)]
            else:
                starts = [i for i in positions.get(words[p][0], ()) if i <= p - self.ngram]
            if any(all(same(i + k, p + k) for k in range(1, length)) for i in starts):
                hold = min(hold, words[p][1])
                break
        # Spaces go out with the word after them: a cut drops the spaces before it.
        while hold > self.sent and raw[hold - 1].isspace():
            hold -= 1
        return max(hold, self.sent)

    def _release(self, end: int, final: str | None = None) -> str:
        source = final if final is not None else self.raw
        if end <= self.sent:
            return ""
        out = source[self.sent : end]
        self.sent = end
        return out
