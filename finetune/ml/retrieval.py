"""A lexical index of past support exchanges: the nearest ones ground every reply.

Plain Python: build it from ``Exchange`` rows (a customer message, the reply that
answered it, its intent), save it into a directory beside the dataset it was built
from, load it in the trainer, the evaluation and the serving process, and ask it for
the exchanges nearest to a customer message::

    index = RetrievalIndex.build(exchanges)
    index.save(dataset_dir / "retrieval")
    index = RetrievalIndex.load(dataset_dir / "retrieval")
    for hit in index.search("i cant find my invoice for order 123", k=3):
        print(round(hit.score, 3), hit.exchange.intent, hit.exchange.reply[:60])

Why TF-IDF over character n-grams (scikit-learn's ``char_wb``, 2 to 5 letters) rather
than words: customers write "cancelation", "activ8", "pls" and "u", and a word index
misses every one of them. Measured on the Bitext split (docs/quality-research.md):
the nearest exchange has the customer's intent for 97.2% of validation messages with
character n-grams (numbers folded), 90.6% with word unigrams and bigrams (the old
baseline's index).

Numbers and redaction placeholders are folded into one symbol before indexing: the
dataset says "order {{ORDER_ID}}" where a live customer writes "order 4512", and both
must look alike to the index.

The saved form holds no pickle (loading a pickle runs code): vocabulary and counts as
JSON, weights as ``.npy``/``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
EXCHANGES_FILE = "exchanges.jsonl"
VOCABULARY_FILE = "vocabulary.json"
IDF_FILE = "idf.npy"
MATRIX_FILE = "matrix.npz"

# char_wb: n-grams inside word boundaries (padded with a space), so "order" and "orders"
# share most of theirs and a typo costs a few n-grams, not the whole word.
ANALYZER = "char_wb"
NGRAM_RANGE = (2, 5)
# Caps the vocabulary of very large ticket sets; Bitext's 3,290 questions use ~45k n-grams.
MAX_FEATURES = 400_000
# Rows scored per matrix product in search_many: bounds the dense score block to ~40 MB.
_CHUNK = 256

_SLOT_RE = re.compile(r"\{\{[^{}]{0,60}\}\}|\[[A-Za-z][A-Za-z _/.-]{0,40}\]")
_NUMBER_RE = re.compile(r"\d[\d\s./-]*\d|\d")


class RetrievalIndexError(ValueError):
    """The index directory is missing, incomplete or of another format; the message says what to do."""


@dataclass(frozen=True)
class Exchange:
    """One past exchange: what the customer wrote and the reply that answered it."""

    question: str
    reply: str
    intent: str = ""
    origin: str = ""  # where it came from (ticket:<source>:<id>, review:<id>), shown to agents


@dataclass(frozen=True)
class Neighbour:
    """An exchange found for a query, with its cosine similarity (0..1) and its row in the index."""

    exchange: Exchange
    score: float
    position: int


def normalise_query(text: str) -> str:
    """Lower-case text with template slots and numbers folded into one symbol ("0")."""
    text = _SLOT_RE.sub(" 0 ", text or "")
    text = _NUMBER_RE.sub("0", text)
    return " ".join(text.lower().split())


def retrieval_query(messages: Sequence[Mapping[str, str]]) -> str:
    """The text to search with for a conversation (``finetune.ml.prompting`` roles).

    The customer's latest turn is what the reply answers. A very short one ("and the
    other one?", "yes pls") says little by itself, so the customer's turn before it
    is searched with it. The same function serves index building (on the turns before
    each reply) and chat, so both search with the same kind of text.
    """
    customer = [m.get("content", "") for m in messages if m.get("role") == "customer" and m.get("content")]
    if not customer:
        return ""
    last = customer[-1].strip()
    if len(last.split()) < 4 and len(customer) > 1:
        return customer[-2].strip() + "\n" + last
    return last


def exchanges_from_conversations(
    conversations: Iterable[Sequence[Mapping[str, str]]],
    intents: Iterable[str] | None = None,
    origins: Iterable[str] | None = None,
) -> list[Exchange]:
    """Exchanges from conversations whose last turn is the agent's reply (the dataset's ``messages``)."""
    intents_list = list(intents) if intents is not None else None
    origins_list = list(origins) if origins is not None else None
    exchanges: list[Exchange] = []
    for i, turns in enumerate(conversations):
        if not turns or turns[-1].get("role") != "agent":
            continue
        question = retrieval_query(turns[:-1])
        reply = (turns[-1].get("content") or "").strip()
        if not question or not reply:
            continue
        exchanges.append(
            Exchange(
                question=question,
                reply=reply,
                intent=intents_list[i] if intents_list is not None else "",
                origin=origins_list[i] if origins_list is not None else "",
            )
        )
    return exchanges


def intent_vote(neighbours: Sequence[Neighbour], top: int = 5) -> tuple[str, float]:
    """The intent with the most similarity among the ``top`` nearest, and its share of it (0..1).

    ("", 0.0) when the neighbours carry no intent.
    """
    weights: Counter = Counter()
    for hit in neighbours[:top]:
        if hit.exchange.intent:
            weights[hit.exchange.intent] += max(hit.score, 0.0)
    total = sum(weights.values())
    if not weights or total <= 0:
        return "", 0.0
    intent, weight = weights.most_common(1)[0]
    return intent, weight / total


class RetrievalIndex:
    """TF-IDF (character n-grams) over the customer messages of past exchanges; cosine search."""

    def __init__(self, exchanges: list[Exchange], vectorizer, matrix):
        self.exchanges = exchanges
        self._vectorizer = vectorizer
        self._matrix = matrix  # one L2-normalised row per exchange, CSR

    def __len__(self) -> int:
        return len(self.exchanges)

    @classmethod
    def build(cls, exchanges: Iterable[Exchange]) -> RetrievalIndex:
        from sklearn.feature_extraction.text import TfidfVectorizer

        rows = [e for e in exchanges if e.question.strip() and e.reply.strip()]
        if not rows:
            raise ValueError("A retrieval index needs at least one exchange with a question and a reply.")
        vectorizer = TfidfVectorizer(
            analyzer=ANALYZER,
            ngram_range=NGRAM_RANGE,
            sublinear_tf=True,
            max_features=MAX_FEATURES,
            dtype=_float32(),
        )
        matrix = vectorizer.fit_transform([normalise_query(e.question) for e in rows]).tocsr()
        return cls(rows, vectorizer, matrix)

    def search(self, query: str, k: int = 3, *, exclude: int | None = None) -> list[Neighbour]:
        """The ``k`` exchanges nearest to ``query``, best first (fewer if the index is smaller).

        ``exclude`` is a row to leave out: training grounds each example on its
        neighbours, never on itself.
        """
        return self.search_many([query], k, exclude=[exclude])[0]

    def search_many(
        self, queries: Sequence[str], k: int = 3, *, exclude: Sequence[int | None] | None = None
    ) -> list[list[Neighbour]]:
        """``search`` for many queries at once (one sparse product per chunk of queries)."""
        import numpy as np

        if exclude is not None and len(exclude) != len(queries):
            raise ValueError("exclude must give one row (or None) per query")
        if k <= 0 or not queries:
            return [[] for _ in queries]
        results: list[list[Neighbour]] = []
        for start in range(0, len(queries), _CHUNK):
            chunk = [normalise_query(q) for q in queries[start : start + _CHUNK]]
            scores = (self._vectorizer.transform(chunk) @ self._matrix.T).toarray()
            if exclude is not None:
                for row, position in enumerate(exclude[start : start + _CHUNK]):
                    if position is not None and 0 <= position < scores.shape[1]:
                        scores[row, position] = -1.0
            take = min(k, scores.shape[1])
            # argpartition then a sort of the k best: O(n) per query instead of a full sort.
            best = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            for row, candidates in enumerate(best):
                ordered = sorted(candidates, key=lambda j: (-scores[row, j], j))
                results.append(
                    [
                        Neighbour(self.exchanges[int(j)], float(scores[row, j]), int(j))
                        for j in ordered
                        if scores[row, j] >= 0.0
                    ]
                )
        return results

    # --- persistence ---------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the index into ``directory`` (created; files replaced), readable by ``load``."""
        import numpy as np
        from scipy import sparse

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        vocabulary = sorted(self._vectorizer.vocabulary_.items(), key=lambda item: item[1])
        with (path / EXCHANGES_FILE).open("w", encoding="utf-8") as handle:
            for exchange in self.exchanges:
                handle.write(json.dumps(asdict(exchange), ensure_ascii=False) + "\n")
        (path / VOCABULARY_FILE).write_text(json.dumps([term for term, _ in vocabulary], ensure_ascii=False))
        np.save(path / IDF_FILE, self._vectorizer.idf_.astype("float64"), allow_pickle=False)
        sparse.save_npz(path / MATRIX_FILE, self._matrix, compressed=True)
        # Written last: a directory with index.json is complete.
        (path / INDEX_FILE).write_text(
            json.dumps(
                {
                    "format": FORMAT_VERSION,
                    "kind": "tfidf",
                    "analyzer": ANALYZER,
                    "ngram_range": list(NGRAM_RANGE),
                    "exchanges": len(self.exchanges),
                    "features": len(vocabulary),
                },
                indent=2,
            )
            + "\n"
        )
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RetrievalIndex:
        import numpy as np
        from scipy import sparse
        from sklearn.feature_extraction.text import TfidfVectorizer

        path = Path(directory)
        hint = "Rebuild the dataset (python manage.py build_dataset), which writes its retrieval index."
        meta_path = path / INDEX_FILE
        if not meta_path.exists():
            raise RetrievalIndexError(f"No retrieval index in {path} (no {INDEX_FILE}). {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT_VERSION or meta.get("kind") != "tfidf":
                raise RetrievalIndexError(
                    f"The retrieval index in {path} has format {meta.get('format')!r} "
                    f"({meta.get('kind')!r}); this version reads format {FORMAT_VERSION}. {hint}"
                )
            exchanges = [
                Exchange(**json.loads(line))
                for line in (path / EXCHANGES_FILE).read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
            terms = json.loads((path / VOCABULARY_FILE).read_text(encoding="utf-8"))
            idf = np.load(path / IDF_FILE, allow_pickle=False)
            matrix = sparse.load_npz(path / MATRIX_FILE).tocsr()
        except RetrievalIndexError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise RetrievalIndexError(f"The retrieval index in {path} cannot be read ({problem}). {hint}") from exc
        if matrix.shape != (len(exchanges), len(terms)) or len(idf) != len(terms):
            raise RetrievalIndexError(
                f"The retrieval index in {path} is inconsistent ({len(exchanges)} exchanges, {len(terms)} terms, "
                f"matrix {matrix.shape}). {hint}"
            )
        vectorizer = TfidfVectorizer(
            analyzer=meta.get("analyzer", ANALYZER),
            ngram_range=tuple(meta.get("ngram_range", NGRAM_RANGE)),
            sublinear_tf=True,
            vocabulary={term: i for i, term in enumerate(terms)},
            dtype=_float32(),
        )
        vectorizer.idf_ = idf
        return cls(exchanges, vectorizer, matrix)


def _float32():
    import numpy as np

    return np.float32
