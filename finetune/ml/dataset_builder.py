"""Turn conversations into a redacted, deduplicated, tokenized fine-tuning dataset on disk.

Plain Python, no Django: :func:`build_dataset` takes any iterable of
:class:`SourceConversation` (the service streams them from the database), a
tokenizer and :class:`BuildOptions`, and writes a ``datasets.DatasetDict`` with
``train`` and ``validation`` splits plus ``card.json`` and ``README.md``, in the
format of docs/dataset-format.md, and beside them ``retrieval/`` (the index of the
train split's exchanges that grounds every reply) and ``intent/`` (the reply intent
classifier the quality gate scores with; ``finetune.ml.knowledge``). Rendering and tokenizing go through
``finetune.ml.prompting`` only, so training sees exactly the text chat produces.

Memory stays small however many conversations come in: examples are written by
``Dataset.from_generator`` in batches to an Arrow file on disk; what is kept per
example is a few hundred bytes (its stratum and labels for the card's counts, its
token lengths, a 32-byte digest for the content hash and two 16-byte digests for
deduplication). ``BuildOptions.workers`` > 1 prepares examples (redact, render,
tokenize) in forked worker processes, in input order, so the result is identical.

    python -m finetune.ml.dataset_builder tickets.jsonl var/tiny-gpt2 var/datasets/try

Why one module of ~700 lines: one build is one pipeline (prepare each conversation,
in worker processes or not; accept it into ``_Builder``'s counts, digests and
lengths; split; write the card), and the card must describe exactly what those
steps did, so they are read and changed together.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import unicodedata
import uuid
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .knowledge import build_knowledge
from .prompting import (
    IGNORE_INDEX,
    ROLE_AGENT,
    ROLE_CUSTOMER,
    ROLE_SYSTEM,
    assemble_tokens,
    normalise_messages,
    render_example,
    tokenize_examples,
    uses_chat_template,
)
from .redaction import CustomerFields, redact

SPLIT_TRAIN = "train"
SPLIT_VALIDATION = "validation"

# Drop reasons, as they appear in the card.
DROP_NO_AGENT_REPLY = "no_agent_reply"
DROP_NO_CUSTOMER_TURN = "no_customer_turn"
DROP_EMPTY_REPLY = "empty_reply"
DROP_PII = "pii_after_redaction"
DROP_DUPLICATE = "duplicate_exact"
DROP_NEAR_DUPLICATE = "duplicate_normalised"
DROP_BAD_EXAMPLE = "unrenderable"


@dataclass
class SourceConversation:
    """One conversation to learn from: turns with roles ``customer``/``agent``, the last agent turn the target.

    ``origin`` is its provenance (``ticket:<source>:<external_id>``, ``review:<id>``
    or ``correction:<id>``); ``customer`` holds the values to redact from it.
    """

    origin: str
    messages: list[dict[str, str]]
    intent: str = ""
    category: str = ""
    tags: list[str] = field(default_factory=list)
    segment: str = ""
    customer: CustomerFields | None = None


@dataclass
class BuildOptions:
    out_dir: Path
    tokenizer_name: str = ""
    system_prompt: str | None = None  # prepended as a system turn when set
    val_fraction: float = 0.1
    seed: int = 0
    max_examples: int | None = None  # stop after this many kept examples, in input order
    max_length: int = 512  # tokens; longer examples lose their oldest prompt tokens first
    # Processes preparing examples (redact, render, tokenize); 1 prepares in this process.
    # This process still reads the input, deduplicates and writes Arrow, so a few
    # workers are the useful most (docs/benchmarks.md, "Dataset build").
    workers: int = 1
    params: dict[str, Any] = field(default_factory=dict)  # recorded in the card as given


@dataclass
class BuildSummary:
    path: Path
    content_hash: str
    num_train: int
    num_validation: int
    card: dict[str, Any]


def features():
    """The column types of every split (docs/dataset-format.md)."""
    from datasets import Features, List, Value

    return Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "prompt": Value("string"),
            "completion": Value("string"),
            "input_ids": List(Value("int32")),
            "attention_mask": List(Value("int8")),
            "labels": List(Value("int32")),
            "intent": Value("string"),
            "category": Value("string"),
            "tags": List(Value("string")),
            "segment": Value("string"),
            "origin": Value("string"),
        }
    )


# --- per-conversation steps ------------------------------------------------------------------

_WORKER_CHUNK = 64  # conversations per task sent to a worker: amortises pickling, keeps the window small
_LOCAL_CHUNK = 256  # conversations tokenized in one batch without workers: big enough to use every core
# What the content hash covers: the data a trainer reads (prompt and completion are
# derived from messages and the tokenizer, so hashing them would add nothing).
_HASHED_TEXT_COLUMNS = ("messages", "intent", "category", "tags", "segment", "origin")  # plus input_ids, labels
_PUNCT_RE = re.compile(r"[^\w\s{}]+")
_SPACE_RE = re.compile(r"\s+")


def _normalised(text: str) -> str:
    """Text as a near-duplicate check compares it: case, accents, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE_RE.sub(" ", _PUNCT_RE.sub(" ", text)).strip()


def _digest(turns: list[dict[str, str]], normalise: bool) -> bytes:
    hasher = hashlib.blake2b(digest_size=16)
    for turn in turns:
        content = _normalised(turn["content"]) if normalise else turn["content"]
        hasher.update(turn["role"].encode())
        hasher.update(b"\x1f")
        hasher.update(content.encode())
        hasher.update(b"\x1e")
    return hasher.digest()


def _up_to_last_agent_turn(turns: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The turns up to and including the last agent reply; trailing customer turns have no answer to learn."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index]["role"] == ROLE_AGENT:
            return turns[: index + 1]
    return None


def _percentiles(values: array) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def stratified_split(strata: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation rows, each stratum split in proportion, reproducibly for a seed.

    Each stratum sends ``round(n * val_fraction)`` rows to validation but keeps at
    least one in train, so a rare intent is never only in validation.
    """
    by_stratum: dict[int, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        by_stratum[stratum].append(index)
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    train: list[int] = []
    validation: list[int] = []
    for stratum in sorted(by_stratum):
        indices = by_stratum[stratum]
        rng.shuffle(indices)
        n_val = min(round(len(indices) * val_fraction), len(indices) - 1) if val_fraction > 0 else 0
        validation.extend(indices[:n_val])
        train.extend(indices[n_val:])
    # Sorted, so each split keeps the input order and select() reads the Arrow file sequentially.
    return sorted(train), sorted(validation)


@dataclass
class Prepared:
    """One conversation after redaction, rendering and tokenizing, before deduplication."""

    row: dict[str, Any]
    redactions: Counter
    exact: bytes  # digest of the redacted turns
    near: bytes  # digest of the redacted turns, normalised
    digest: bytes  # sha256 of the hashed columns, for the content hash
    full_length: int  # tokens before truncation
    truncated: bool


def prepare_examples(
    conversations: list[SourceConversation], tokenizer, *, system_prompt: str | None, max_length: int
) -> list[Prepared | str]:
    """Redact, render and tokenize conversations; each comes back prepared, or as the reason to drop it.

    Pure (no shared state), so worker processes can run it on chunks in parallel;
    deduplication and counting happen afterwards, in input order. The chunk is
    tokenized in one batch (several times faster than example by example).
    """
    results: list[Prepared | str | None] = []
    staged: list[tuple[int, SourceConversation, list[dict[str, str]], list[dict[str, str]], Counter, Any]] = []
    for conversation in conversations:
        outcome = _render_one(conversation, tokenizer, system_prompt=system_prompt)
        if isinstance(outcome, str):
            results.append(outcome)
        else:
            staged.append((len(results), conversation, *outcome))
            results.append(None)
    # Untruncated first, to record each example's true length; truncation then only
    # re-slices the ids it already has.
    tokenized = tokenize_examples([rendered for *_, rendered in staged], tokenizer, max_length=1 << 30)
    for (index, conversation, messages, redacted, counts, rendered), tokens in zip(staged, tokenized, strict=True):
        results[index] = _finish_one(conversation, messages, redacted, counts, rendered, tokens, max_length)
    return results


def prepare_example(
    conversation: SourceConversation, tokenizer, *, system_prompt: str | None, max_length: int
) -> Prepared | str:
    """``prepare_examples`` for one conversation."""
    return prepare_examples([conversation], tokenizer, system_prompt=system_prompt, max_length=max_length)[0]


def _render_one(conversation: SourceConversation, tokenizer, *, system_prompt: str | None):
    """Redacted messages and their rendering, or the reason to drop the conversation."""
    try:
        turns = normalise_messages(
            {"role": m["role"], "content": m.get("content", "")}
            for m in conversation.messages
            if m.get("role") != ROLE_SYSTEM
        )
    except ValueError:
        return DROP_BAD_EXAMPLE
    turns = _up_to_last_agent_turn(turns) if turns else None
    if not turns:
        has_agent = any(m.get("role") == ROLE_AGENT for m in conversation.messages)
        return DROP_EMPTY_REPLY if has_agent else DROP_NO_AGENT_REPLY
    if not any(t["role"] == ROLE_CUSTOMER for t in turns[:-1]):
        return DROP_NO_CUSTOMER_TURN

    counts: Counter = Counter()
    redacted: list[dict[str, str]] = []
    for turn in turns:
        result = redact(turn["content"], conversation.customer)
        counts.update(result.counts)
        # result.residual is find_pii(result.text), computed by redact's own final pass.
        if result.residual:
            return DROP_PII
        redacted.append({"role": turn["role"], "content": result.text})

    messages = [{"role": ROLE_SYSTEM, "content": system_prompt}, *redacted] if system_prompt else redacted
    try:
        rendered = render_example(messages, tokenizer)
    except ValueError:
        return DROP_BAD_EXAMPLE
    return messages, redacted, counts, rendered


def _finish_one(conversation, messages, redacted, counts, rendered, tokens, max_length: int) -> Prepared | str:
    if tokens is None:
        return DROP_BAD_EXAMPLE  # the reply tokenizes to nothing
    full_length = len(tokens["input_ids"])
    if full_length > max_length:
        prompt_length = sum(1 for label in tokens["labels"] if label == IGNORE_INDEX)
        ids = tokens["input_ids"]
        tokens = assemble_tokens(ids[:prompt_length], ids[prompt_length:], max_length=max_length)
    if not any(label != IGNORE_INDEX for label in tokens["labels"]):
        return DROP_EMPTY_REPLY

    row = {
        "messages": messages,
        "prompt": rendered.prompt,
        "completion": rendered.completion,
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "labels": tokens["labels"],
        "intent": conversation.intent or "",
        "category": conversation.category or "",
        "tags": list(conversation.tags or []),
        "segment": conversation.segment or "",
        "origin": conversation.origin,
    }
    hasher = hashlib.sha256(
        json.dumps(
            {key: row[key] for key in _HASHED_TEXT_COLUMNS}, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        ).encode()
    )
    # Token ids as packed int32, not JSON: the same information, hashed several times faster.
    hasher.update(array("i", row["input_ids"]).tobytes())
    hasher.update(array("i", row["labels"]).tobytes())
    return Prepared(
        row=row,
        redactions=counts,
        exact=_digest(redacted, normalise=False),
        near=_digest(redacted, normalise=True),
        digest=hasher.digest(),
        full_length=full_length,
        truncated=full_length > max_length,
    )


# --- parallel preparation ---------------------------------------------------------------------

_worker_state: dict[str, Any] = {}


def _worker_init(tokenizer, system_prompt: str | None, max_length: int) -> None:
    # Tokenizers must not start their own thread pool in each worker: the cores are taken.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(tokenizer=tokenizer, system_prompt=system_prompt, max_length=max_length)


def _worker_prepare(chunk: list[SourceConversation]) -> list[Prepared | str]:
    state = _worker_state
    return prepare_examples(
        chunk, state["tokenizer"], system_prompt=state["system_prompt"], max_length=state["max_length"]
    )


def _batched(items: Iterable[SourceConversation], size: int) -> Iterator[list[SourceConversation]]:
    batch: list[SourceConversation] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Builder:
    def __init__(self, tokenizer, options: BuildOptions, progress: Callable[[int], None] | None):
        self.tokenizer = tokenizer
        self.options = options
        self.progress = progress
        self.seen = 0
        self.dropped: Counter = Counter()
        self.redactions: Counter = Counter()
        self.truncated = 0
        self.stopped_at_max = False
        self.exact_seen: set[bytes] = set()
        self.normalised_seen: set[bytes] = set()
        self.stratum_ids: dict[str, int] = {}
        self.strata: list[int] = []
        self.row_digests = bytearray()
        self.lengths = array("I")
        self.full_lengths = array("I")
        self.reply_lengths = array("I")
        # Per-row labels for the card's counts by split, kept as small ints.
        self.label_ids: dict[tuple[str, str], int] = {}
        self.row_labels: list[tuple[int, ...]] = []
        self.origins: Counter = Counter()

    def _label(self, kind: str, value: str) -> int:
        key = (kind, value)
        if key not in self.label_ids:
            self.label_ids[key] = len(self.label_ids)
        return self.label_ids[key]

    def accept(self, prepared: Prepared | str) -> dict[str, Any] | None:
        """Deduplicate and count one prepared conversation, in input order; return its row or None."""
        if isinstance(prepared, str):
            self.dropped[prepared] += 1
            return None
        if prepared.exact in self.exact_seen:
            self.dropped[DROP_DUPLICATE] += 1
            return None
        if prepared.near in self.normalised_seen:
            self.dropped[DROP_NEAR_DUPLICATE] += 1
            return None
        self.exact_seen.add(prepared.exact)
        self.normalised_seen.add(prepared.near)
        self.redactions.update(prepared.redactions)
        self.truncated += prepared.truncated
        row = prepared.row
        stratum_key = row["intent"] or row["category"] or ""
        self.strata.append(self.stratum_ids.setdefault(stratum_key, len(self.stratum_ids)))
        self.row_digests += prepared.digest
        self.lengths.append(len(row["input_ids"]))
        self.full_lengths.append(prepared.full_length)
        self.reply_lengths.append(sum(1 for label in row["labels"] if label != IGNORE_INDEX))
        self.row_labels.append(
            (
                self._label("intent", row["intent"]),
                self._label("category", row["category"]),
                self._label("segment", row["segment"]),
                *(self._label("tag", tag) for tag in row["tags"]),
            )
        )
        self.origins[row["origin"].split(":", 1)[0]] += 1
        return row

    def _prepared(self, conversations: Iterable[SourceConversation]) -> Iterator[Prepared | str]:
        options = self.options
        if options.workers <= 1:
            for chunk in _batched(conversations, _LOCAL_CHUNK):
                yield from prepare_examples(
                    chunk, self.tokenizer, system_prompt=options.system_prompt, max_length=options.max_length
                )
            return
        # Fork where the platform has it: the workers share the parent's tokenizer and
        # libraries (torch alone is ~300 MB, which "spawn" would load again in every
        # worker). Safe here because the workers only redact and tokenize: they never
        # touch the parent's database connection or run torch (whose OpenMP threads
        # do not survive a fork), and they leave with os._exit, closing nothing of the parent's.
        start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        # An executor rather than multiprocessing.Pool: if a worker dies (killed for
        # memory), waiting on its result raises BrokenProcessPool instead of hanging.
        executor = ProcessPoolExecutor(
            max_workers=options.workers,
            mp_context=multiprocessing.get_context(start_method),
            initializer=_worker_init,
            initargs=(self.tokenizer, options.system_prompt, options.max_length),
        )
        try:
            # A bounded window of chunks in flight: Executor.map would read the whole
            # input (every ticket in the database) ahead of the workers.
            pending: deque = deque()
            for chunk in _batched(conversations, _WORKER_CHUNK):
                pending.append(executor.submit(_worker_prepare, chunk))
                if len(pending) >= 2 * options.workers + 1:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def rows(self, conversations: Iterable[SourceConversation]) -> Iterator[dict[str, Any]]:
        kept = 0
        limit = self.options.max_examples
        for prepared in self._prepared(conversations):
            if limit is not None and kept >= limit:
                self.stopped_at_max = True
                break
            self.seen += 1
            if self.progress is not None:
                self.progress(1)
            row = self.accept(prepared)
            if row is not None:
                kept += 1
                yield row

    def counts_by_split(self, train: list[int], validation: list[int]) -> dict[str, dict[str, dict[str, int]]]:
        names = {index: key for key, index in self.label_ids.items()}
        result: dict[str, dict[str, dict[str, int]]] = {}
        for split, indices in ((SPLIT_TRAIN, train), (SPLIT_VALIDATION, validation)):
            counter: dict[str, Counter] = defaultdict(Counter)
            for index in indices:
                for label in self.row_labels[index]:
                    kind, value = names[label]
                    counter[kind][value or "(none)"] += 1
            result[split] = {kind: dict(sorted(c.items())) for kind, c in sorted(counter.items())}
        return result


def _readme(card: dict[str, Any]) -> str:
    def table(title: str, rows: dict[str, Any]) -> list[str]:
        if not rows:
            return [f"**{title}**: none", ""]
        return [f"**{title}**", "", "| | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items()), ""]

    total = card["counts"]["total"]
    lengths = card["token_lengths"]["input"]
    lines = [
        f"# Dataset {card['name']}",
        "",
        "Fine-tuning examples for SupportBot, built by `manage.py build_dataset` from historical",
        "tickets and agent feedback. Personal data was replaced by typed placeholders such as",
        "`{{EMAIL}}`; examples still matching a personal-data pattern afterwards were dropped.",
        "Format: docs/dataset-format.md. Load with `datasets.load_from_disk(<this folder>)`.",
        "",
        f"- Built: {card['built_at']}",
        f"- Tokenizer: `{card['tokenizer']}` ({card['template']} template), max length {card['params']['max_length']}",
        f"- Examples: {card['num_train']} train, {card['num_validation']} validation "
        f"(from {card['conversations_seen']} conversations)",
        f"- Content hash (sha256): `{card['content_hash']}`",
        f"- Token lengths: p50 {lengths.get('p50', 0)}, p95 {lengths.get('p95', 0)}, max {lengths.get('max', 0)}; "
        f"{card['truncated']} truncated (reply kept)",
        "",
        *table("Examples by intent", total.get("intent", {})),
        *table("Examples by category", total.get("category", {})),
        *table("Examples by register tag", total.get("tag", {})),
        *table("Examples by customer segment", total.get("segment", {})),
        *table("Examples by origin", card["origins"]),
        *table("Redactions by type", card["redactions"]),
        *table("Dropped by reason", card["dropped"]),
        "Build parameters:",
        "",
        "```json",
        json.dumps(card["params"], indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def build_dataset(
    conversations: Iterable[SourceConversation],
    tokenizer,
    options: BuildOptions,
    *,
    progress: Callable[[int], None] | None = None,
) -> BuildSummary:
    """Write the DatasetDict, card.json and README.md to ``options.out_dir`` and describe them.

    Everything is written into a hidden sibling folder first and renamed at the end,
    so an interrupted build never leaves a folder that looks like a finished dataset.
    Raises ValueError when no example survives (nothing is written then).
    """
    import datasets
    from datasets import Dataset, DatasetDict

    out_dir = Path(options.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another output folder.")
    if not 0 <= options.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {options.val_fraction}.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    work.mkdir()
    builder = _Builder(tokenizer, options, progress)
    # The caller draws its own progress (per conversation); datasets' bars per split would interleave with it.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        try:
            generated = Dataset.from_generator(
                # A closure, not gen_kwargs: datasets splits list arguments into shards.
                lambda: builder.rows(conversations),
                features=features(),
                cache_dir=str(work / "cache"),
                # An explicit fingerprint stops datasets from hashing the generator and its
                # arguments (pickling a Django queryset would load every row into memory).
                fingerprint=uuid.uuid4().hex,
            )
        except Exception as exc:
            # datasets raises its own error when the generator yields nothing at all.
            if not builder.strata:
                raise ValueError(_nothing_kept_message(builder)) from exc
            raise
        if len(generated) == 0:
            raise ValueError(_nothing_kept_message(builder))
        train_idx, val_idx = stratified_split(builder.strata, options.val_fraction, options.seed)
        splits = DatasetDict({SPLIT_TRAIN: generated.select(train_idx), SPLIT_VALIDATION: generated.select(val_idx)})
        data_dir = work / "data"
        # datasets writes no shard at all for an empty split selected by indices, and
        # load_from_disk then fails (IndexError); one explicit shard keeps it loadable.
        splits.save_to_disk(str(data_dir), num_shards={name: 1 for name, split in splits.items() if len(split) == 0})

        # The retrieval index and the intent classifier derive from the rows (hashed below),
        # so they need no hash of their own (finetune.ml.knowledge).
        knowledge_card = build_knowledge(
            work,
            splits[SPLIT_TRAIN]["messages"],
            splits[SPLIT_TRAIN]["intent"],
            splits[SPLIT_TRAIN]["origin"],
            splits[SPLIT_VALIDATION]["messages"],
            splits[SPLIT_VALIDATION]["intent"],
        )

        hasher = hashlib.sha256()
        for index in (*train_idx, *val_idx):
            hasher.update(builder.row_digests[index * 32 : (index + 1) * 32])
        content_hash = hasher.hexdigest()
        by_split = builder.counts_by_split(train_idx, val_idx)
        total: dict[str, dict[str, int]] = {}
        for split_counts in by_split.values():
            for kind, values in split_counts.items():
                merged = Counter(total.get(kind, {}))
                merged.update(values)
                total[kind] = dict(sorted(merged.items()))
        card = {
            "name": out_dir.name,
            "format": "docs/dataset-format.md",
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tokenizer": options.tokenizer_name,
            "template": "chat" if uses_chat_template(tokenizer) else "plain",
            "system_prompt": options.system_prompt or "",
            "params": {
                "val_fraction": options.val_fraction,
                "seed": options.seed,
                "max_examples": options.max_examples,
                "max_length": options.max_length,
                **options.params,
            },
            "content_hash": content_hash,
            "num_train": len(train_idx),
            "num_validation": len(val_idx),
            "conversations_seen": builder.seen,
            "stopped_at_max_examples": builder.stopped_at_max,
            "counts": {"total": total, **by_split},
            "origins": dict(sorted(builder.origins.items())),
            "token_lengths": {
                "input": _percentiles(builder.lengths),
                "before_truncation": _percentiles(builder.full_lengths),
                "reply": _percentiles(builder.reply_lengths),
            },
            "truncated": builder.truncated,
            "redactions": dict(sorted(builder.redactions.items())),
            "dropped": dict(sorted(builder.dropped.items())),
            **knowledge_card,
        }
        shutil.rmtree(work / "cache", ignore_errors=True)
        # The DatasetDict files sit at the top of the folder, beside the card, so
        # load_from_disk(out_dir) works on the folder itself.
        for item in data_dir.iterdir():
            item.rename(work / item.name)
        data_dir.rmdir()
        (work / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
        (work / "README.md").write_text(_readme(card))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        work.rename(out_dir)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return BuildSummary(
        path=out_dir,
        content_hash=content_hash,
        num_train=len(train_idx),
        num_validation=len(val_idx),
        card=card,
    )


def _nothing_kept_message(builder: _Builder) -> str:
    if builder.seen == 0:
        return "No conversations to build from: import tickets first (manage.py import_tickets) or widen --since."
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(builder.dropped.items()))
    return f"None of the {builder.seen} conversations made a usable example ({reasons})."


def conversations_from_jsonl(path: str | Path) -> Iterator[SourceConversation]:
    """Conversations straight from a ticket JSONL file (the importer's format), for scripts and tests."""
    return conversations_from_file(path, "jsonl", source="file")


def conversations_from_file(path: str | Path, fmt: str, *, source: str) -> Iterator[SourceConversation]:
    """Conversations straight from a ticket file in any importer format (``jsonl``, ``bitext``, …),
    without the database: for scripts, benchmarks and tests. Origins are ``ticket:<source>:<id>``."""
    from .importers import ParsedTicket, read_tickets

    for item in read_tickets(path, fmt):
        if isinstance(item, ParsedTicket):
            yield SourceConversation(
                origin=f"ticket:{source}:{item.external_id}",
                messages=[{"role": m.role, "content": m.body} for m in item.messages],
                intent=item.intent,
                category=item.category,
                tags=item.tags,
                segment=item.customer_segment,
                customer=CustomerFields.from_values(
                    name=item.customer_name,
                    email=item.customer_email,
                    phone=item.customer_phone,
                    address=item.customer_address,
                    identifiers=item.customer_identifiers,
                ),
            )


if __name__ == "__main__":
    from transformers import AutoTokenizer

    source, model_dir, out = sys.argv[1:4]
    summary = build_dataset(
        conversations_from_jsonl(source),
        AutoTokenizer.from_pretrained(model_dir),
        BuildOptions(out_dir=Path(out), tokenizer_name=model_dir),
    )
    print(json.dumps({k: summary.card[k] for k in ("num_train", "num_validation", "dropped", "redactions")}))  # noqa: T201
