"""Which intent does a reply answer? The classifier behind the quality gate's intent accuracy.

A reply can read well and still answer the wrong question ("you can get a refund…"
to "my package has not arrived"); ROUGE-L barely notices, an intent check does.
The classifier is trained on the replies of the training split (never on validation),
then predicts the intent of each generated reply; intent accuracy is the share of
validation examples whose generated reply is classified as the example's intent.

TF-IDF over word unigrams and bigrams + logistic regression (scikit-learn). On the
Bitext split it labels the agents' own validation replies correctly 98.6% of the
time: the ceiling any bot can be measured against (docs/quality-research.md).

    classifier = IntentClassifier.train(replies, intents)
    classifier.save(run_dir / "intent")
    IntentClassifier.load(run_dir / "intent").predict(["Your refund was issued…"])

Saved without pickle (loading a pickle runs code): vocabulary, weights and classes as
JSON and ``.npy`` files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

FORMAT_VERSION = 1
META_FILE = "intent.json"
VOCABULARY_FILE = "vocabulary.json"
IDF_FILE = "idf.npy"
COEF_FILE = "coef.npy"
INTERCEPT_FILE = "intercept.npy"

NGRAM_RANGE = (1, 2)
# Weak regularisation: replies of one intent share many exact phrases, and a strong
# prior only blurs them (C=1 loses ~1 point of accuracy on Bitext validation replies).
C = 10.0
MAX_FEATURES = 200_000  # bounds the saved size on very large ticket sets


class IntentClassifierError(ValueError):
    """The classifier cannot be trained or loaded; the message says why and what to do."""


class IntentClassifier:
    def __init__(self, vectorizer, model):
        self._vectorizer = vectorizer
        self._model = model

    @property
    def intents(self) -> list[str]:
        return [str(c) for c in self._model.classes_]

    @classmethod
    def train(cls, replies: Sequence[str], intents: Sequence[str], *, seed: int = 0) -> IntentClassifier:
        """Fit on (reply, intent) pairs; pairs without an intent are left out."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(replies) != len(intents):
            raise ValueError("replies and intents differ in length")
        pairs = [(r, i) for r, i in zip(replies, intents, strict=True) if i and r and r.strip()]
        labels = sorted({i for _, i in pairs})
        if len(labels) < 2:
            raise IntentClassifierError(
                f"An intent classifier needs replies of at least two intents; the training split has "
                f"{len(labels)} ({', '.join(labels) or 'none'}). Import tickets with intents or skip intent accuracy."
            )
        vectorizer = TfidfVectorizer(ngram_range=NGRAM_RANGE, sublinear_tf=True, max_features=MAX_FEATURES)
        features = vectorizer.fit_transform([r for r, _ in pairs])
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed)
        model.fit(features, [i for _, i in pairs])
        return cls(vectorizer, model)

    def predict(self, replies: Sequence[str]) -> list[str]:
        if not replies:
            return []
        return [str(x) for x in self._model.predict(self._vectorizer.transform(list(replies)))]

    def accuracy(self, replies: Sequence[str], intents: Sequence[str]) -> float | None:
        """Share of replies classified as their intent, over the pairs that have one (None if none do)."""
        pairs = [(r, i) for r, i in zip(replies, intents, strict=True) if i]
        if not pairs:
            return None
        predicted = self.predict([r for r, _ in pairs])
        return sum(p == i for p, (_, i) in zip(predicted, pairs, strict=True)) / len(pairs)

    def save(self, directory: str | Path) -> Path:
        import numpy as np

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        vocabulary = sorted(self._vectorizer.vocabulary_.items(), key=lambda item: item[1])
        (path / VOCABULARY_FILE).write_text(json.dumps([t for t, _ in vocabulary], ensure_ascii=False))
        np.save(path / IDF_FILE, self._vectorizer.idf_.astype("float64"), allow_pickle=False)
        np.save(path / COEF_FILE, self._model.coef_.astype("float64"), allow_pickle=False)
        np.save(path / INTERCEPT_FILE, self._model.intercept_.astype("float64"), allow_pickle=False)
        (path / META_FILE).write_text(
            json.dumps({"format": FORMAT_VERSION, "classes": self.intents, "ngram_range": list(NGRAM_RANGE)}, indent=2)
            + "\n"
        )
        return path

    @classmethod
    def load(cls, directory: str | Path) -> IntentClassifier:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        path = Path(directory)
        if not (path / META_FILE).exists():
            raise IntentClassifierError(f"No intent classifier in {path} (no {META_FILE}); train one first.")
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT_VERSION:
                raise IntentClassifierError(
                    f"The intent classifier in {path} has format {meta.get('format')!r}; this version reads "
                    f"{FORMAT_VERSION}. Train it again."
                )
            terms = json.loads((path / VOCABULARY_FILE).read_text(encoding="utf-8"))
            idf = np.load(path / IDF_FILE, allow_pickle=False)
            coef = np.load(path / COEF_FILE, allow_pickle=False)
            intercept = np.load(path / INTERCEPT_FILE, allow_pickle=False)
        except IntentClassifierError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise IntentClassifierError(
                f"The intent classifier in {path} cannot be read ({type(exc).__name__}: {exc}); train it again."
            ) from exc
        classes = meta["classes"]
        # Binary logistic regression keeps one row of weights, multiclass one per class.
        rows = 1 if len(classes) == 2 else len(classes)
        if coef.shape != (rows, len(terms)) or idf.shape != (len(terms),) or intercept.shape != (rows,):
            raise IntentClassifierError(f"The intent classifier in {path} is inconsistent; train it again.")
        vectorizer = TfidfVectorizer(
            ngram_range=tuple(meta.get("ngram_range", NGRAM_RANGE)),
            sublinear_tf=True,
            vocabulary={t: i for i, t in enumerate(terms)},
        )
        vectorizer.idf_ = idf
        model = LogisticRegression(C=C)
        model.classes_ = np.array(classes)
        model.coef_ = coef
        model.intercept_ = intercept
        return cls(vectorizer, model)
