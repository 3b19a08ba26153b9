"""What a dataset and a model version carry besides weights: the retrieval index, the intent
classifier and the grounding / decoding / reply-policy settings. Plain Python.

Layout (phase B of issue 10)::

    DATASET_DIR/retrieval/   RetrievalIndex built from the train split only (card.json: "retrieval")
    DATASET_DIR/intent/      IntentClassifier trained on the train split's replies (card.json: "intent_classifier")

    RUN_DIR/train_config.json   TrainConfig + "grounding" (GroundingConfig), "decoding" (DecodingConfig),
                                "reply_policy" (ReplyPolicyConfig)
    RUN_DIR/retrieval/, RUN_DIR/intent/   copied from the dataset by training: a version
                                carries what it needs to serve (an index swap is a model swap)
    RUN_DIR/adapter/, RUN_DIR/merged/     the weights (ModelVersion.adapter_path / merged_path)

``load_knowledge(path)`` accepts the run directory or its ``merged/`` / ``adapter/``
directory (what a ModelVersion records) and returns what it finds; anything absent is
None, so versions trained before grounding still load and serve as before::

    knowledge = load_knowledge(version.merged_path)
    prompt, hits = ground_conversation(
        messages, knowledge.index, tokenizer, config=knowledge.grounding_or_default, max_prompt_tokens=...
    )   # knowledge.index None: the plain prompt, no hits
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .decoding import DecodingConfig
from .grounding import GroundingConfig
from .intent import IntentClassifier, IntentClassifierError
from .reply_policy import ReplyPolicyConfig
from .retrieval import RetrievalIndex, RetrievalIndexError

log = logging.getLogger(__name__)

RETRIEVAL_DIR = "retrieval"
INTENT_DIR = "intent"
TRAIN_CONFIG_FILE = "train_config.json"


@dataclass
class Knowledge:
    """What was found for a dataset or version; None where it is absent."""

    index: RetrievalIndex | None = None
    classifier: IntentClassifier | None = None
    grounding: GroundingConfig | None = None
    decoding: DecodingConfig | None = None
    policy: ReplyPolicyConfig | None = None
    root: Path | None = None  # the directory they were read from

    @property
    def grounded(self) -> bool:
        return self.index is not None

    @property
    def grounding_or_default(self) -> GroundingConfig:
        return self.grounding or GroundingConfig()

    @property
    def decoding_or_default(self) -> DecodingConfig:
        return self.decoding or DecodingConfig()

    @property
    def policy_or_default(self) -> ReplyPolicyConfig:
        return self.policy or ReplyPolicyConfig()


def config_to_json(config) -> dict[str, Any] | None:
    return None if config is None else asdict(config)


def config_from_json(cls, data: Mapping[str, Any] | None):
    """A frozen config dataclass from its JSON; None for None; unknown keys (a newer version's) ignored."""
    if data is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _root(path: str | Path) -> Path:
    """The run directory for a run, ``merged/`` or ``adapter/`` directory; a dataset directory as it is."""
    p = Path(path)
    if p.name in ("merged", "adapter") and not (p / RETRIEVAL_DIR).is_dir():
        return p.parent
    return p


def load_knowledge(path: str | Path | None, *, strict: bool = False) -> Knowledge:
    """The index, classifier and configs of a dataset, run or version directory (absent -> None).

    A present but unreadable index or classifier is logged and left out (the version still
    serves, ungrounded), unless ``strict``, which raises (evaluation wants to know).
    """
    if not path:
        return Knowledge()
    root = _root(path)
    knowledge = Knowledge(root=root)
    if (root / RETRIEVAL_DIR).is_dir():
        try:
            knowledge.index = RetrievalIndex.load(root / RETRIEVAL_DIR)
        except RetrievalIndexError:
            if strict:
                raise
            log.exception("The retrieval index in %s cannot be loaded; replies will not be grounded", root)
    if (root / INTENT_DIR).is_dir():
        try:
            knowledge.classifier = IntentClassifier.load(root / INTENT_DIR)
        except IntentClassifierError:
            if strict:
                raise
            log.exception("The intent classifier in %s cannot be loaded", root)
    config_path = root / TRAIN_CONFIG_FILE
    if config_path.exists():
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if strict:
                raise
            log.exception("%s cannot be read", config_path)
            data = {}
        knowledge.grounding = config_from_json(GroundingConfig, data.get("grounding"))
        knowledge.decoding = config_from_json(DecodingConfig, data.get("decoding"))
        knowledge.policy = config_from_json(ReplyPolicyConfig, data.get("reply_policy"))
    return knowledge


def build_knowledge(
    out_dir: str | Path,
    train_messages,
    train_intents,
    train_origins,
    validation_messages=(),
    validation_intents=(),
) -> dict[str, Any]:
    """Build ``retrieval/`` (train split only) and ``intent/`` into a dataset directory; returns card entries.

    The index holds every usable training exchange (tickets and agent-approved
    corrections alike); the intent classifier is trained on the training replies
    (placeholders filled with neutral words in the conversation's language, as evaluation
    fills every reply it scores)
    only when they carry at least two intents. Validation rows are never indexed: they
    are the questions the index must answer.
    """
    from .retrieval import exchanges_from_conversations

    out = Path(out_dir)
    card: dict[str, Any] = {}
    exchanges = exchanges_from_conversations(train_messages, train_intents, train_origins)
    if exchanges:
        index = RetrievalIndex.build(exchanges)
        index.save(out / RETRIEVAL_DIR)
        meta = json.loads((out / RETRIEVAL_DIR / "index.json").read_text(encoding="utf-8"))
        card["retrieval"] = {"exchanges": meta["exchanges"], "features": meta["features"], "dir": RETRIEVAL_DIR}
    from finetune.serving.placeholders import reply_language

    # Each reply filled in its conversation's language, as evaluation and serving fill the
    # replies this classifier labels.
    replies = [
        fill_neutral(e.reply, language=reply_language([{"role": "customer", "content": e.question}])) for e in exchanges
    ]
    intents = [e.intent for e in exchanges]
    if len({i for i in intents if i}) >= 2:
        classifier = IntentClassifier.train(replies, intents)
        classifier.save(out / INTENT_DIR)
        val = [
            (fill_neutral(m[-1].get("content", ""), language=reply_language(m[:-1])), i)
            for m, i in zip(validation_messages, validation_intents, strict=False)
            if i and m and m[-1].get("role") == "agent"
        ]
        accuracy = classifier.accuracy([r for r, _ in val], [i for _, i in val]) if val else None
        card["intent_classifier"] = {
            "intents": len(classifier.intents),
            "train_replies": sum(1 for i in intents if i),
            "validation_accuracy": None if accuracy is None else round(accuracy, 4),
            "dir": INTENT_DIR,
        }
    return card


def fill_neutral(text: str, values: Mapping[str, str] | None = None, language: str | None = None) -> str:
    """A reply with its template slots in neutral words (and the customer's values): how replies are scored.

    No company facts: the dataset and the gate do not depend on what the bot profile
    says today, so a profile edit does not move the scores. ``language`` is the
    conversation's (``placeholders.reply_language``), as serving fills it; None: English.
    """
    from finetune.serving.placeholders import fill_placeholders

    return fill_placeholders(text, {}, values or {}, language)


def copy_knowledge(dataset_dir: str | Path, run_dir: str | Path, *, retrieval: bool = True) -> list[str]:
    """Copy the dataset's ``retrieval/`` (unless ``retrieval`` is False: a run trained ungrounded)
    and ``intent/`` into ``run_dir``; returns the names copied."""
    copied = []
    for name in (RETRIEVAL_DIR, INTENT_DIR) if retrieval else (INTENT_DIR,):
        source = Path(dataset_dir) / name
        if source.is_dir():
            target = Path(run_dir) / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
            copied.append(name)
    return copied
