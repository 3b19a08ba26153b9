"""Customer segments of a message: its language register and its language.

Plain Python, cheap enough to run on every customer message when it is saved
(under 1 ms a message on this project's two-core machine once the word lists are
loaded; ``bench/bench_segments.py`` measures it), so the monitoring dashboard reads
stored labels and never re-scans text.

    >>> message_segments("can u help me cancel my order pls")
    {'registers': ['polite', 'colloquial'], 'register': 'colloquial', 'language': 'en', 'segmenter_version': 1}

**Registers** are the ones the Bitext sample tags (its README): ``polite`` (P),
``colloquial`` (Q), ``typos`` (Z), ``offensive`` (W) and ``keyword_only`` (K). A
message can carry several; one that carries none is ``plain``. The detector is a
set of rules over the word lists in :mod:`finetune.ml.lexicons` and an English
dictionary (pyspellchecker's word-frequency list), tuned on one half of the Bitext
sample and measured on the other (docs/bias-monitoring.md has the figures):

- *offensive*: a swear word or insult (masked spellings such as "f*ck" included);
- *polite*: "please", thanks, greetings, and the modal forms of deference
  ("could you", "would it be possible", "I'd like");
- *colloquial*: chat spellings ("u", "wanna", "pls"), a lower-case "i", a dropped
  subject ("need help with my order"), or a lower-case question with no question
  mark;
- *typos*: a word the dictionary does not know that is one edit away from one it
  does ("recieve"), two known words run together ("upthe"), or a doubled space;
- *keyword_only*: at most six words (numbers aside) with no pronoun, article,
  auxiliary or question word ("cancel order 1234").

Registers describe English: for a message in another language only *offensive*
is looked for (its word list is English too, so it rarely fires there), and the
message is otherwise ``plain``: another language's words are not typos, nor its
short sentences keywords.

**Language** comes from py3langid (a maintained fork of langid.py; model shipped
inside the package, no network), restricted to the languages support traffic
is likely to be in (``DEFAULT_LANGUAGES``): on the Bitext messages (all English)
that cuts its errors from 1.6% to 0.2%. Text too short to tell ("ok", "1234") is ``und``.

Labels carry ``SEGMENTER_VERSION``: a stored label says which rules made it, so a
change to the rules can re-label old messages instead of mixing two definitions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from finetune.ml import lexicons

SEGMENTER_VERSION = 1

POLITE = "polite"
COLLOQUIAL = "colloquial"
TYPOS = "typos"
OFFENSIVE = "offensive"
KEYWORD_ONLY = "keyword_only"
PLAIN = "plain"
REGISTERS = (POLITE, COLLOQUIAL, TYPOS, OFFENSIVE, KEYWORD_ONLY)
REGISTER_LABELS = (*REGISTERS, PLAIN)

# The Bitext sample's tag letters for the registers (its other letters describe
# syntax and wording, not register: B basic, I interrogative, L lexical, ...).
BITEXT_TAG_REGISTERS = {"P": POLITE, "Q": COLLOQUIAL, "Z": TYPOS, "W": OFFENSIVE, "K": KEYWORD_ONLY}

# When a chart needs one register per message: the one that most likely shapes the
# reply wins (an offensive typo-laden message is charted as offensive).
PRIMARY_REGISTER_ORDER = (OFFENSIVE, KEYWORD_ONLY, TYPOS, COLLOQUIAL, POLITE, PLAIN)

UNDETERMINED_LANGUAGE = "und"
# Languages of most European and large-market support traffic; py3langid knows 97,
# and leaving all of them in mislabels short English messages (as Latin, Nigerian
# Pidgin, ...) about eight times as often. Pass ``languages=None`` to use all of them.
DEFAULT_LANGUAGES = (
    "en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "sk", "hu", "ro", "el",
    "tr", "ru", "uk", "bg", "ar", "he", "fa", "hi", "bn", "ur", "id", "ms", "vi", "th", "zh", "ja", "ko",
)  # fmt: skip
# Fewer letters than this and the language is not guessed: "ok", "hi" and an order
# number are in no language in particular.
MIN_LETTERS_FOR_LANGUAGE = 4
# English wins over a guess below this confidence when at least ENGLISH_WORD_SHARE
# of the words are common English words (frequency >= COMMON_ENGLISH_FREQUENCY) or
# misspellings of them, and ENGLISH_WORD_SHARE_SPELT are spelt right. On the
# hand-written sample no message in another language passes both.
ENGLISH_OVERRIDE_MAX_CONFIDENCE = 0.9
ENGLISH_WORD_SHARE = 0.75
ENGLISH_WORD_SHARE_SPELT = 0.5
COMMON_ENGLISH_FREQUENCY = 5000
_NON_LETTERS_RE = re.compile(r"[\d#$€£%]+")

# Words a support conversation uses that a general dictionary may lack.
DOMAIN_WORDS = frozenset(
    {
        "signup", "sign-up", "login", "logon", "logout", "username", "usernames", "password", "passwords",
        "freemium", "newsletter", "newsletters", "checkout", "eta", "etas", "app", "apps", "ecommerce",
        "e-commerce", "online", "offline", "paypal", "iban", "pin", "sim", "esim", "wifi", "wi-fi", "email",
        "e-mail", "emails", "inbox", "voucher", "vouchers", "refundable", "unsubscribe", "unsubscribing",
        "resubscribe", "reactivate", "reactivating", "deactivate", "deactivating", "chatbot", "bot",
        "prepaid", "postpaid", "preorder", "pre-order", "backorder", "website", "webpage", "url", "faq",
        "faqs", "sms", "otp", "2fa", "cancelation", "cancelations", "canceling", "canceled", "cancelling",
        "refund", "refunds", "refunded", "reimburse", "reimbursed", "reimbursement", "rebate", "rebates",
        "invoice", "invoices", "invoiced", "shipment", "shipments", "tracking", "subscription", "subscriptions",
    }
)  # fmt: skip

# pyspellchecker's list counts words in subtitles; its rarest entries (count 50) are
# still real words ("reimbursements", "unsubscribe"), so every entry counts as known.
MIN_WORD_FREQUENCY = 50
# A split of an unknown word into two known ones ("upthe", "reimbursementof") counts
# only when both halves are at least this common, so a rare word is not taken for two
# words run together.
MIN_SPLIT_FREQUENCY = 200
# A listed word rarer than this that is one edit from a word this many times more
# common is taken for a misspelling of it ("oder" 146 vs "order" 258,122).
RARE_WORD_FREQUENCY = 1000
RARE_VARIANT_RATIO = 1000
KEYWORD_ONLY_MAX_WORDS = 6
TYPO_CACHE_SIZE = 200_000  # words; about 20 MB at most

# Words whose presence says the message is a sentence, not a string of keywords.
_SENTENCE_WORDS = frozenset(
    {
        "i", "i'm", "i'd", "i've", "me", "my", "mine", "we", "us", "our", "you", "u", "ya", "it", "a", "an",
        "the", "is", "are", "am", "was", "were", "be", "do", "does", "did", "can", "could", "would", "will",
        "should", "shall", "may", "might", "must", "how", "what", "where", "when", "why", "which", "who",
        "please", "pls", "help", "need", "want", "wanna", "hi", "hello", "hey", "thanks", "thank", "there",
        "have", "has",
    }
)  # fmt: skip
_QUESTION_OPENINGS = ("how", "what", "where", "when", "why", "which", "who", "is", "are", "do", "does", "can",
                      "could", "will", "would", "should", "am", "any", "was")  # fmt: skip

_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_TOKEN_RE = re.compile(r"\S+")
_LOWER_I_RE = re.compile(r"(?:^|[\s,;:(])i(?:['’](?:m|d|ve|ll)\b|\b)(?!\.\w)")
_MASKED_SWEAR_RE = re.compile(r"\b(?:f[*#@!%]+(?:ck|k|cking|king|in|ing)?|s[*#@!%]+t|sh[*#@!%]+t|b[*#@!%]+ch)\b", re.I)
_DOUBLE_SPACE_RE = re.compile(r"\S {2,}\S")
_FINAL_QUESTION_RE = re.compile(r"\?\s*\W*$")
_HONORIFICS = frozenset({"mr", "mrs", "ms", "miss", "dr", "prof", "mx", "sir", "madam"})
_REAL_WORD_ERRORS = tuple((re.compile(r"\b" + pattern + r"\b"), label) for pattern, label in lexicons.REAL_WORD_ERRORS)
_ARTICLE_RE = re.compile(r"\b(a|an)\s+([^\W\d_]+)", re.IGNORECASE)
# A space before "?", "!" or "," (English puts none there; French typography does).
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\w\s+[?!,](?:\s|$)")
# A word run into a number or a price ("order113542617735902", "refunding$1").
_GLUED_NUMBER_RE = re.compile(r"\b[a-z]{4,}(?:\$\d|\d{3,})")
# "an" before these consonant letters is right only for silent-h and letter-name words.
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "herb", "fbi", "mba", "sms", "faq", "x")
# "a" before these vowel letters is right when the vowel sounds like a consonant.
_A_EXCEPTIONS = ("one", "once", "uni", "use", "usu", "user", "euro", "eu", "ur", "ut", "uk", "us")


def _article_wrong(article: str, word: str) -> bool:
    """Whether the article misfits the first letter of the next word ("an payment", "a order")."""
    lowered = word.lower()
    if article.lower() == "an":
        return lowered[0] not in "aeiou" and not lowered.startswith(_AN_EXCEPTIONS) and not word.isupper()
    return lowered[0] in "aeio" and not lowered.startswith(_A_EXCEPTIONS) and not word.isupper()


def _phrase_pattern(phrases: Iterable[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(phrases) + r")\b", re.IGNORECASE)


_POLITE_RE = _phrase_pattern(lexicons.POLITE_PATTERNS)
_OFFENSIVE_PHRASE_RE = _phrase_pattern(re.escape(p) for p in lexicons.OFFENSIVE_PHRASES)
_SUBJECT_DROP_RE = re.compile(r"^(?:" + "|".join(re.escape(p) for p in lexicons.SUBJECT_DROP_OPENINGS) + r")\b")


@dataclass(frozen=True)
class RegisterDetection:
    """The registers found in one message and, for each, what made it fire."""

    registers: tuple[str, ...]  # in REGISTERS order; (PLAIN,) when none
    evidence: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return primary_register(self.registers)


def primary_register(registers: Iterable[str]) -> str:
    """One register for a message that has several (``PRIMARY_REGISTER_ORDER``); ``plain`` for none."""
    found = set(registers)
    return next((name for name in PRIMARY_REGISTER_ORDER if name in found), PLAIN)


def registers_from_bitext_tags(tags: str | Iterable[str]) -> tuple[str, ...]:
    """The registers a Bitext tag string ("BLQZ") or tag list names, in REGISTERS order."""
    letters = set(tags) if isinstance(tags, str) else {letter for tag in tags for letter in str(tag)}
    found = {BITEXT_TAG_REGISTERS[letter] for letter in letters if letter in BITEXT_TAG_REGISTERS}
    return tuple(name for name in REGISTERS if name in found) or (PLAIN,)


class _Dictionary:
    """pyspellchecker's English word-frequency list, loaded once (about 1 s, 30 MB) and shared."""

    _lock = threading.Lock()
    _frequencies: dict[str, int] | None = None

    @classmethod
    def frequencies(cls) -> dict[str, int]:
        if cls._frequencies is None:
            with cls._lock:
                if cls._frequencies is None:
                    from spellchecker import SpellChecker

                    cls._frequencies = dict(SpellChecker(language="en").word_frequency.dictionary)
        return cls._frequencies


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Endings the frequency list may lack a form for, and what the stem may end in.
_INFLECTIONS = (
    ("ies", ("y",)),
    ("es", ("", "e")),
    ("s", ("",)),
    ("ing", ("", "e")),
    ("ed", ("", "e")),
    ("er", ("", "e")),
)
_DOUBLING_SUFFIXES = ("ing", "ed", "er")
_VOWELS = "aeiou"


def _needs_doubling(stem: str) -> bool:
    """A stem ending consonant-vowel-consonant doubles its last letter before -ing/-ed ("ship")."""
    return len(stem) >= 3 and stem[-1] not in _VOWELS + "wxy" and stem[-2] in _VOWELS and stem[-3] not in _VOWELS


# Endings of contractions, as written without and with their apostrophe.
_CONTRACTIONS = (("nt", "n't"), ("re", "'re"), ("ve", "'ve"), ("ll", "'ll"), ("s", "'s"), ("d", "'d"), ("m", "'m"))


def _glued_you(word: str, known) -> bool:
    """'u' run into the next word ("uhelp", "ushow"): chat spelling, not a typo."""
    return len(word) > 3 and word.startswith("u") and known(word[1:])


def _edits1(word: str) -> set[str]:
    """Every string one deletion, transposition, substitution or insertion away (Norvig's speller)."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    deletes = [left + right[1:] for left, right in splits if right]
    transposes = [left + right[1] + right[0] + right[2:] for left, right in splits if len(right) > 1]
    replaces = [left + c + right[1:] for left, right in splits if right for c in _LETTERS]
    inserts = [left + c + right for left, right in splits for c in _LETTERS]
    return set(deletes + transposes + replaces + inserts)


class RegisterDetector:
    """Labels a customer message with its registers. Thread-safe; build one and reuse it.

    ``extra_vocabulary``: words of this business that are not typos (product names,
    plan names), on top of ``DOMAIN_WORDS``.
    """

    def __init__(self, *, extra_vocabulary: Iterable[str] = ()) -> None:
        self._extra = frozenset(word.lower() for word in extra_vocabulary) | DOMAIN_WORDS
        # Verdicts per lower-cased word: support vocabulary repeats, and an unknown
        # word's edits are the costly part. Bounded so a flood of junk cannot grow it.
        self._typo_cache: dict[str, bool] = {}

    def _known(self, word: str, minimum: int = MIN_WORD_FREQUENCY) -> bool:
        return (
            word in self._extra
            or word in lexicons.COLLOQUIAL_TOKENS
            or word in lexicons.PROFANITY
            or _Dictionary.frequencies().get(word, 0) >= minimum
        )

    def _known_form(self, word: str) -> bool:
        """Known as it is or as an inflection of a known word (the list lacks some plurals)."""
        if self._known(word):
            return True
        for suffix, replacements in _INFLECTIONS:
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                stem = word[: -len(suffix)]
                if suffix in _DOUBLING_SUFFIXES and _needs_doubling(stem):
                    continue  # "shiping" is not "ship" + "ing": that is "shipping"
                if any(self._known(stem + ending) for ending in replacements):
                    return True
        return False

    def _apostrophe_dropped(self, word: str) -> bool:
        """A contraction written without its apostrophe ("hasnt", "youre", "thats")."""
        return any(
            word.endswith(ending) and len(word) > len(ending) + 1 and self._known(word[: -len(ending)] + contracted)
            for ending, contracted in _CONTRACTIONS
        )

    def _rare_variant(self, word: str) -> bool:
        """A rare listed word one edit from a far more common one ("oder", "wat", "thew"):
        the frequency list keeps such misspellings from subtitles."""
        frequency = _Dictionary.frequencies().get(word, 0)
        if not 0 < frequency < RARE_WORD_FREQUENCY or word in self._extra or word in lexicons.COLLOQUIAL_TOKENS:
            return False
        frequencies = _Dictionary.frequencies()
        best = max((frequencies.get(candidate, 0) for candidate in _edits1(word)), default=0)
        return best >= RARE_VARIANT_RATIO * frequency

    def is_typo(self, word: str) -> bool:
        """Whether one word, on its own, is taken for a misspelling of an English word."""
        return self._typo(word.lower())

    def _typo(self, word: str) -> bool:
        cached = self._typo_cache.get(word)
        if cached is None:
            cached = self._typo_uncached(word)
            if len(self._typo_cache) < TYPO_CACHE_SIZE:
                self._typo_cache[word] = cached
        return cached

    def _typo_uncached(self, word: str) -> bool:
        """An unknown word that is one edit from a known one, or two common words run together."""
        if len(word) < 2:
            return False
        if self._known_form(word):
            return len(word) >= 3 and self._rare_variant(word)
        bare = word.replace("'", "").replace("’", "")
        if bare != word and self._known(bare):  # "dont", "cant" are colloquial, not typos
            return False
        if _glued_you(bare, self._known_form) or self._apostrophe_dropped(bare):
            return False  # "uhelp", "hasnt": colloquial spellings, not typos
        if any(self._known(candidate) for candidate in _edits1(bare)):
            return True
        return any(
            self._known(bare[:i], MIN_SPLIT_FREQUENCY) and self._known(bare[i:], MIN_SPLIT_FREQUENCY)
            for i in range(1, len(bare))
        )

    def typos(self, text: str) -> list[str]:
        """What in ``text`` is taken for a typo or slip: unknown words (proper nouns and
        acronyms skipped), real-word misspellings, "a"/"an" mismatches, a space before
        punctuation, a word glued to a number."""
        found = []
        sentence_start = True
        after_honorific = False
        for token in _TOKEN_RE.findall(text):
            if "@" in token or "://" in token or token.startswith(("{{", "#", "www.")):
                sentence_start = token.endswith((".", "!", "?"))
                continue
            if _MASKED_SWEAR_RE.fullmatch(token.strip(".,!?;:")):
                continue  # "f*ck" is offensive, not misspelt
            if after_honorific:  # "Ms. Hawkings": a name, whatever the dictionary says
                after_honorific = False
                continue
            if token.lower().rstrip(".") in _HONORIFICS:
                after_honorific = True
                continue
            for word in _WORD_RE.findall(token):
                capitalised = word[:1].isupper()
                if word.isupper() and len(word) > 1:
                    continue  # acronyms and shouting are not misspellings
                if capitalised and not sentence_start:
                    continue  # a proper noun the dictionary may not know
                if any(c.isupper() for c in word[1:]):
                    continue  # CamelCase product names
                if self._typo(word.lower()):
                    found.append(word)
                sentence_start = False
            if token.endswith((".", "!", "?")):
                sentence_start = True
        lowered = text.lower()
        found += [label for pattern, label in _REAL_WORD_ERRORS if pattern.search(lowered)]
        found += [f"{article} {word}" for article, word in _ARTICLE_RE.findall(text) if _article_wrong(article, word)]
        found += ["space before punctuation"] * bool(_SPACE_BEFORE_PUNCT_RE.search(text))
        found += [f"glued: {match}" for match in _GLUED_NUMBER_RE.findall(text)]
        return found

    def detect(self, text: str, *, language: str = "en") -> RegisterDetection:
        """The registers of ``text``; English rules unless ``language`` says otherwise."""
        text = text or ""
        english = language in ("en", UNDETERMINED_LANGUAGE)
        lowered = text.lower()
        words = [word.lower().replace("’", "'") for word in _WORD_RE.findall(text)]
        evidence: dict[str, tuple[str, ...]] = {}

        offensive = [w for w in words if w in lexicons.PROFANITY or w in lexicons.INSULTS]
        offensive += _MASKED_SWEAR_RE.findall(text) + _OFFENSIVE_PHRASE_RE.findall(text)
        if offensive:
            evidence[OFFENSIVE] = tuple(offensive)

        if english:
            polite = _POLITE_RE.findall(text)
            if polite:
                evidence[POLITE] = tuple(match.lower() for match in polite)

            colloquial = [w for w in words if w in lexicons.COLLOQUIAL_TOKENS]
            colloquial += [
                w
                for w in words
                if not self._known_form(w) and (_glued_you(w, self._known_form) or self._apostrophe_dropped(w))
            ]
            stripped = lowered.strip()
            if _LOWER_I_RE.search(text):
                colloquial.append("lower-case i")
            if _SUBJECT_DROP_RE.match(stripped):
                colloquial.append("dropped subject")
            if (
                text.strip()[:1].islower()
                and stripped.startswith(tuple(q + " " for q in _QUESTION_OPENINGS))
                and not _FINAL_QUESTION_RE.search(text)
            ):
                colloquial.append("question without question mark")
            if colloquial:
                evidence[COLLOQUIAL] = tuple(colloquial)

            typos = self.typos(text)
            if _DOUBLE_SPACE_RE.search(text.strip()):
                typos.append("double space")
            if typos:
                evidence[TYPOS] = tuple(typos)

        content = [w for w in words if w not in lexicons.PROFANITY]
        if (
            english
            and 0 < len(content) <= KEYWORD_ONLY_MAX_WORDS
            and not any(w in _SENTENCE_WORDS for w in content)
            and "?" not in text
            and POLITE not in evidence
        ):
            evidence[KEYWORD_ONLY] = ("short, no function words",)

        registers = tuple(name for name in REGISTERS if name in evidence) or (PLAIN,)
        return RegisterDetection(registers=registers, evidence=evidence)


@lru_cache(maxsize=1)
def default_detector() -> RegisterDetector:
    return RegisterDetector()


def detect_registers(text: str, *, language: str = "en") -> tuple[str, ...]:
    """The registers of one message, with the default detector (``("plain",)`` when none)."""
    return default_detector().detect(text, language=language).registers


class LanguageDetector:
    """py3langid restricted to ``languages`` (ISO 639-1 codes; None: all 97 it knows). Thread-safe."""

    def __init__(self, languages: Iterable[str] | None = DEFAULT_LANGUAGES) -> None:
        self.languages = tuple(languages) if languages is not None else None
        self._identifier = None
        self._lock = threading.Lock()

    def _get(self):
        if self._identifier is None:
            with self._lock:
                if self._identifier is None:
                    from py3langid.langid import MODEL_FILE, LanguageIdentifier

                    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
                    if self.languages is not None:
                        identifier.set_languages(list(self.languages))
                    self._identifier = identifier
        return self._identifier

    def detect(self, text: str) -> str:
        """The language code of ``text``, or ``und`` when it has too few letters to tell.

        Character n-grams alone misread short English keyword messages ("refund
        status" comes out as German); when most words are common English words and
        the model is not sure, the answer is English.
        """
        letters = sum(1 for char in text or "" if char.isalpha())
        if letters < MIN_LETTERS_FOR_LANGUAGE:
            return UNDETERMINED_LANGUAGE
        # Digits, order numbers and prices say nothing about the language.
        language, confidence = self._get().classify(_NON_LETTERS_RE.sub(" ", text).strip())
        if (
            language != "en"
            and confidence < ENGLISH_OVERRIDE_MAX_CONFIDENCE
            and (self.languages is None or "en" in self.languages)
            and _looks_english(text)
        ):
            return "en"
        return language


def _looks_english(text: str) -> bool:
    """Most words are common English words, or misspellings of them ("i wanna cancle my ordr"),
    and at least half are spelt right (a French sentence is full of near-English words)."""
    return (
        english_word_share(text, count_typos=False) >= ENGLISH_WORD_SHARE_SPELT
        and english_word_share(text, count_typos=True) >= ENGLISH_WORD_SHARE
    )


def english_word_share(text: str, *, count_typos: bool = False) -> float:
    """Share of the words of ``text`` that are common English words (0.0 when it has none);
    with ``count_typos``, misspellings of English words count too."""
    words = [word.lower() for word in _WORD_RE.findall(text)]
    if not words:
        return 0.0
    frequencies = _Dictionary.frequencies()

    def common(word: str) -> bool:
        return (
            frequencies.get(word, 0) >= COMMON_ENGLISH_FREQUENCY
            or word in DOMAIN_WORDS
            or word in lexicons.COLLOQUIAL_TOKENS
        )

    detector = default_detector()
    return sum(
        1 for word in words if common(word) or _glued_you(word, common) or (count_typos and detector.is_typo(word))
    ) / len(words)


@lru_cache(maxsize=1)
def default_language_detector() -> LanguageDetector:
    return LanguageDetector()


def detect_language(text: str) -> str:
    """ISO 639-1 code of the message's language (``und`` when too short to tell)."""
    return default_language_detector().detect(text)


def message_segments(text: str) -> dict:
    """The segment labels to store with a customer message: JSON-ready.

    ``registers`` (all that apply, or ``["plain"]``), ``register`` (the primary one,
    for charts that need one per message), ``language`` and ``segmenter_version``.
    """
    language = detect_language(text)
    detection = default_detector().detect(text, language=language)
    return {
        "registers": list(detection.registers),
        "register": detection.primary,
        "language": language,
        "segmenter_version": SEGMENTER_VERSION,
    }


def register_scores(texts: Iterable[str], gold: Iterable[Iterable[str]]) -> dict:
    """Precision, recall and F1 per register label of the default detector against ``gold``
    label sets (e.g. ``registers_from_bitext_tags(tags)``), and the share of messages whose
    whole label set matches. What bench/bench_segments.py reports."""
    detector = default_detector()
    predicted = [set(detector.detect(text).registers) for text in texts]
    expected = [set(labels) for labels in gold]
    if len(predicted) != len(expected) or not predicted:
        raise ValueError("register_scores needs as many gold label sets as texts, and at least one")
    per_label = {}
    for label in REGISTER_LABELS:
        tp = sum(1 for p, g in zip(predicted, expected, strict=True) if label in p and label in g)
        n_pred = sum(1 for p in predicted if label in p)
        n_gold = sum(1 for g in expected if label in g)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {
            "support": n_gold,
            "predicted": n_pred,
            "precision": round(precision, 3),
            "recall": round(recall, 3),
            "f1": round(f1, 3),
        }
    exact = sum(1 for p, g in zip(predicted, expected, strict=True) if p == g) / len(predicted)
    return {"n": len(predicted), "exact_set_match": round(exact, 3), "per_register": per_label}


def _bitext_style(tags: Iterable[str]) -> bool:
    """Bitext writes its tags as single capital letters; other sources' tags ("vip", "billing") are not registers."""
    tags = list(tags)
    return bool(tags) and all(len(tag) == 1 and tag.isascii() and tag.isupper() for tag in tags)


def ticket_segments(tags: Iterable[str], customer_text: str) -> dict:
    """Register labels of a historical ticket: from its Bitext tags where it has them, else the detector.

    Returns ``registers``, ``register`` (primary), ``register_source`` ("tags" or
    "detector") and ``segmenter_version``; JSON-ready.
    """
    tags = [str(tag) for tag in tags or ()]
    if _bitext_style(tags):
        registers, source = registers_from_bitext_tags(tags), "tags"
    else:
        language = detect_language(customer_text or "")
        registers, source = default_detector().detect(customer_text or "", language=language).registers, "detector"
    return {
        "registers": list(registers),
        "register": primary_register(registers),
        "register_source": source,
        "segmenter_version": SEGMENTER_VERSION,
    }
