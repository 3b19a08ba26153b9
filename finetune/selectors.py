"""Read-side queries for tickets, datasets, runs and model versions.

The dataset selectors turn rows into the plain ``SourceConversation`` records the
dataset builder takes, streaming them with ``iterator()`` so a build over 100,000
tickets never holds them all in memory. What a build reads from the chat (agents'
feedback, the system prompt) comes through ``finetune.providers``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Q

from . import providers
from .ml.dataset_builder import SourceConversation
from .ml.redaction import CustomerFields
from .models import DatasetVersion, ModelVersion, Ticket, TicketMessage, TrainingRun

# Tickets fetched per round trip while streaming, and whose messages are fetched together.
TICKET_CHUNK_SIZE = 1000


def model_version_active(*, for_update: bool = False) -> ModelVersion | None:
    """The version serving customers, if any; ``for_update`` locks its row (inside a transaction)."""
    versions = ModelVersion.objects.select_for_update() if for_update else ModelVersion.objects
    return versions.filter(status=ModelVersion.Status.ACTIVE).first()


def model_version_of_run(run: TrainingRun) -> ModelVersion | None:
    """The version a training run produced, if it got that far."""
    return ModelVersion.objects.filter(training_run=run).first()


def dataset_version_latest() -> DatasetVersion | None:
    return DatasetVersion.objects.order_by("-created_at", "-id").first()


def dataset_versions_recent(*, limit: int) -> list[DatasetVersion]:
    """The newest ``limit`` dataset versions, newest first."""
    return list(DatasetVersion.objects.order_by("-created_at", "-id")[:limit])


def dataset_version_find(name_or_id: str) -> DatasetVersion | None:
    """The dataset version with this name, or this id when the text is a number."""
    query = Q(name=name_or_id) | (Q(pk=int(name_or_id)) if name_or_id.isdigit() else Q())
    return DatasetVersion.objects.filter(query).first()


def _tickets(*, since: datetime | None, sources: Sequence[str] | None):
    tickets = Ticket.objects.all()
    if since is not None:
        tickets = tickets.filter(created_at__gte=since)
    if sources:
        tickets = tickets.filter(source__in=list(sources))
    return tickets


def ticket_count(*, since: datetime | None = None, sources: Sequence[str] | None = None) -> int:
    return _tickets(since=since, sources=sources).count()


def ticket_conversations(
    *, since: datetime | None = None, sources: Sequence[str] | None = None
) -> Iterator[SourceConversation]:
    """Every ticket (opened at or after ``since``, from ``sources``) as a conversation, oldest id first.

    Ordered by id so a build over the same tickets sees them in the same order
    (deduplication keeps the first of a pair, and the content hash depends on order).
    """
    fields = (
        "id",
        "source",
        "external_id",
        "intent",
        "category",
        "tags",
        "customer_segment",
        "customer_name",
        "customer_email",
        "customer_phone",
        "customer_address",
        "customer_identifiers",
    )
    # Plain values rather than model instances and prefetch_related: the build reads
    # every ticket once, and building Ticket objects cost more than the query itself.
    rows = _tickets(since=since, sources=sources).order_by("id").values_list(*fields)
    chunk: list[tuple] = []
    for row in rows.iterator(chunk_size=TICKET_CHUNK_SIZE):
        chunk.append(row)
        if len(chunk) == TICKET_CHUNK_SIZE:
            yield from _conversations_of(chunk)
            chunk = []
    if chunk:
        yield from _conversations_of(chunk)


def _conversations_of(tickets: list[tuple]) -> Iterator[SourceConversation]:
    """Conversations for one chunk of ticket rows, with all their messages in one query."""
    threads: dict[int, list[dict[str, str]]] = {row[0]: [] for row in tickets}
    messages = (
        TicketMessage.objects.filter(ticket_id__in=list(threads))
        .order_by("ticket_id", "position")
        .values_list("ticket_id", "role", "body")
    )
    for ticket_id, role, body in messages:
        threads[ticket_id].append({"role": role, "content": body})
    for ticket_id, source, external_id, intent, category, tags, segment, name, email, phone, address, ids in tickets:
        yield SourceConversation(
            origin=f"ticket:{source}:{external_id}",
            messages=threads[ticket_id],
            intent=intent,
            category=category,
            tags=list(tags or []),
            segment=segment,
            customer=CustomerFields.from_values(
                name=name, email=email, phone=phone, address=address, identifiers=ids or []
            ),
        )


def training_examples_from_feedback(*, since: datetime | None = None) -> Iterator[SourceConversation]:
    """Agents' corrections and approved replies that a model admin approved for training, as conversations.

    Nothing reviewed or corrected reaches a dataset without that approval. The chat
    app owns those rules (which candidates, their context and provenance
    ``review:<id>`` / ``correction:<id>``) and registers the reader
    (``finetune.providers``); ``since`` keeps only those approved on or after it.
    """
    return iter(providers.chat_data().feedback_examples(since=since))


def training_system_prompt() -> str | None:
    """The system prompt the chat sends (company name and policy), so examples start the same way."""
    return providers.chat_data().system_prompt()


def training_run_live(lane: str | None = TrainingRun.DEFAULT_LANE) -> TrainingRun | None:
    """The queued or running run of ``lane`` (of any lane when None)."""
    runs = TrainingRun.objects.filter(status__in=TrainingRun.LIVE_STATUSES)
    return (runs if lane is None else runs.filter(lane=lane)).first()


def training_run_phase_text(run: TrainingRun) -> str:
    """What a live run does now, in words with the phase's own progress ("Evaluating the base model:
    12/32 replies"); empty once it has finished (its status says how)."""
    if run.status == TrainingRun.Status.QUEUED:
        return "Waiting for a worker to start the run"
    if not run.is_live:
        return ""
    return (run.phase or {}).get("text") or "Starting"


def _training_run_settled(run: TrainingRun, version: ModelVersion | None) -> bool:
    """Whether nothing about a run will change any more: it has ended and, when its version
    passed the gates and asked for it, the automatic promotion (which follows the run's
    end) has been made or refused."""
    if run.is_live:
        return False
    if version is None or version.status != ModelVersion.Status.CANDIDATE:
        return True
    if not (run.hyperparameters.get("auto_promote", True) and (version.gate_results or {}).get("passed")):
        return True
    return f"{version.label} was not promoted" in run.log_tail


def training_run_progress(run: TrainingRun, *, version_url: Callable[[ModelVersion], str]) -> dict[str, Any]:
    """What the run page polls: status, steps, phase, loss, log, and the version it produced (linked by
    ``version_url``). ``title`` is the run's name as the page's heading and breadcrumb show it."""
    version = model_version_of_run(run)
    phase = run.phase or {}
    return {
        "id": run.pk,
        "title": str(run),
        "status": run.status,
        "status_display": run.get_status_display(),
        "is_live": run.is_live,
        "settled": _training_run_settled(run, version),
        "phase": {
            "name": phase.get("name", ""),
            "text": training_run_phase_text(run),
            "done": phase.get("done", 0) if run.is_live else 0,
            "total": phase.get("total", 0) if run.is_live else 0,
        },
        "progress": run.progress,
        "current_step": run.current_step,
        "total_steps": run.total_steps,
        "current_epoch": run.current_epoch,
        "last_loss": run.loss_history[-1]["loss"] if run.loss_history else None,
        "loss_points": len(run.loss_history),
        "log_tail": run.log_tail,
        "error": run.error,
        "cancel_requested": run.cancel_requested,
        "heartbeat_at": run.heartbeat_at.isoformat() if run.heartbeat_at else None,
        "version": (
            {"label": version.label, "status": version.get_status_display(), "url": version_url(version)}
            if version
            else None
        ),
    }


@dataclass(frozen=True)
class MetricRow:
    label: str
    candidate: Any
    active: Any
    better: bool | None  # is the candidate better? None: not comparable or not a quality metric
    note: str = ""

    @property
    def candidate_text(self) -> str:
        return _text(self.candidate)

    @property
    def active_text(self) -> str:
        return _text(self.active)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# (metrics key, label, higher is better?)
_COMPARED = (
    ("eval_loss", "Validation loss", False),
    ("perplexity", "Validation perplexity", False),
    ("rouge_l", "ROUGE-L of generated replies", True),
    ("rouge_l_retrieval", "ROUGE-L of the retrieval baseline", None),
    ("train_loss_last", "Final training loss", None),
    ("num_train", "Training examples", None),
    ("num_validation", "Validation examples", None),
    ("tokens_per_second", "Training speed (tokens/s)", None),
)


def model_version_comparison(version: ModelVersion, active: ModelVersion | None = None) -> list[MetricRow]:
    """Metrics of ``version`` beside the active version's, for the promotion page."""
    if active is None:
        active = model_version_active()
    if active is not None and active.pk == version.pk:
        active = None
    mine, theirs = version.metrics or {}, (active.metrics or {}) if active else {}
    rows = [
        MetricRow("Base model", version.base_model, active.base_model if active else None, None),
        MetricRow(
            "Dataset",
            str(version.dataset_version or "—"),
            str(active.dataset_version or "—") if active else None,
            None,
        ),
    ]
    same_set = bool(mine.get("validation_fingerprint")) and mine.get("validation_fingerprint") == theirs.get(
        "validation_fingerprint"
    )
    for key, label, higher in _COMPARED:
        a, b = mine.get(key), theirs.get(key)
        better = None
        if higher is not None and isinstance(a, int | float) and isinstance(b, int | float):
            better = a > b if higher else a < b
        note = ""
        if key == "eval_loss" and active is not None:
            reference = (mine.get("reference_losses") or {}).get(str(active.pk))
            if reference is not None:
                b = reference
                better = a < b if isinstance(a, int | float) else None
                note = f"{active.label} scored on this version's validation set"
            elif not same_set:
                better = None
                note = "measured on different validation sets"
        rows.append(MetricRow(label, a, b if active else None, better, note))
    return rows


def training_run_outcome_lines(run: TrainingRun) -> list[str]:
    """A finished run's result in words, for the ``finetune`` command (and ``make demo``).

    What each number means, how the model compares with the retrieval baseline, what
    every promotion gate said, and whether the version was promoted and why (or why not).
    The gates' own words are printed as they are: this never judges a gate.
    """
    version = model_version_of_run(run)
    metrics = run.eval_metrics or {}
    before = metrics.get("before") or {}
    config = metrics.get("config") or {}
    lines: list[str] = []
    validation = metrics.get("num_validation")
    if validation:
        lines.append(f"Evaluation on {validation} held-out validation conversation(s):")
    loss = metrics.get("eval_loss")
    if isinstance(loss, int | float):
        was = f" (base model before training: {before['eval_loss']:.4f})" if before.get("eval_loss") is not None else ""
        lines.append(
            f"  validation loss: {loss:.4f}{was}. How surprised the model is by the agents' real replies "
            "(mean cross-entropy per reply token); lower is better."
        )
    perplexity = metrics.get("perplexity")
    if isinstance(perplexity, int | float):
        lines.append(
            f"  perplexity: {perplexity:.4f}. The same as a number of equally likely next words; lower is better."
        )
    rouge, baseline = metrics.get("rouge_l"), metrics.get("rouge_l_retrieval")
    rows = (metrics.get("quality") or {}).get("rows") or {}
    replies = (rows.get("candidate") or {}).get("n") or (
        min(int(config.get("eval_generate_samples") or 0), int(validation or 0)) or None
    )
    on = f" on {replies} generated repl{'y' if replies == 1 else 'ies'}" if replies else ""
    if isinstance(rouge, int | float):
        lines.append(
            f"  ROUGE-L: {rouge:.4f}{on}. The word overlap between the model's replies and the agents' real replies "
            "(longest common word sequence, 0 = nothing shared, 1 = identical); higher is closer."
        )
    if isinstance(baseline, int | float):
        lines.append(
            f"  ROUGE-L of retrieval baseline: {baseline:.4f}. The same score for reusing the reply of the most "
            "similar training ticket (retrieval, no model): the yardstick a generated reply should reach."
        )
    if isinstance(rouge, int | float) and isinstance(baseline, int | float):
        if rouge >= baseline:
            lines.append(
                f"  The model's replies are as close to the agents' as the baseline's or closer "
                f"({rouge:.2f} vs {baseline:.2f})."
            )
        else:
            lines.append(
                f"  The model's replies are further from the agents' than the baseline's ({rouge:.2f} vs "
                f"{baseline:.2f}): copying the nearest ticket's reply would match the agents' wording better."
            )
    if any(rows.get(name) for name in _QUALITY_COLUMNS):
        lines.append(
            "The replies customers would get (the reply_quality gate's rows): ROUGE-L, intent accuracy, replies "
            "showing a template slot, replies repeating themselves, and where replies came from:"
        )
    for name in _QUALITY_COLUMNS:
        row = rows.get(name)
        if row:
            intent = "—" if row.get("intent_accuracy") is None else f"{row['intent_accuracy']:.3f}"
            lines.append(
                f"  {name:20} ROUGE-L {row['rouge_l']:.3f}  intent accuracy {intent}  slots {row['slot_leaks']}"
                f"  repeats {row['repeats']}  model/past/handoff {row.get('model_replies', 0)}/"
                f"{row.get('retrieved', 0)}/{row.get('handoffs', 0)} of {row['n']}"
            )
    if version is None:
        return lines
    results = version.gate_results or {}
    against = results.get("compared_with")
    lines.append(
        f"Promotion gates (compared with the active {against}):"
        if against
        else "Promotion gates (no version was active to compare with):"
    )
    for name, gate in (results.get("gates") or {}).items():
        lines.append(f"  {name}: {'passed' if gate.get('passed') else 'FAILED'}. {gate.get('detail', '')}".rstrip())
    if not results.get("gates"):
        lines.append("  (no gate results recorded)")
    auto = run.hyperparameters.get("auto_promote", True)
    if version.status == ModelVersion.Status.ACTIVE:
        why = "it passed every gate and automatic promotion was on" if auto else "an admin promoted it"
        lines.append(f"{version.label} is now active: {why}.")
    elif not auto:
        lines.append(
            f"{version.label} stays a candidate: automatic promotion was off (--no-promote); "
            "promote it from its admin page."
        )
    elif not results.get("passed"):
        lines.append(
            f"{version.label} stays a candidate: not every gate passed. Promote it from its admin page with a "
            "reason, or retrain."
        )
    else:
        refused = next((line for line in run.log_tail.splitlines() if "was not promoted" in line), "")
        reason = refused.split("was not promoted", 1)[-1].lstrip(": ") if refused else "see the run's log"
        lines.append(f"{version.label} stays a candidate: the promotion was refused ({reason}).")
    return lines


# --- reply quality (issue 10) ---------------------------------------------------------

# Columns of the quality table, in order: the version, what it is compared with, and context.
_QUALITY_COLUMNS = ("candidate", "active", "retrieval", "retrieval-consensus", "base")


@dataclass(frozen=True)
class QualityColumn:
    name: str
    label: str
    row: dict[str, Any]


@dataclass(frozen=True)
class QualityExample:
    question: str
    reference: str
    replies: list[dict[str, Any]]  # one per column: label, reply, source, origin


@dataclass(frozen=True)
class QualityTable:
    columns: list[QualityColumn]
    metrics: list[tuple[str, list[str]]]  # (metric, one text per column)
    examples: list[QualityExample]
    examples_scored: int
    grounded: bool
    gate: dict[str, Any] | None  # the reply_quality gate's stored result


def model_version_quality(version: ModelVersion) -> QualityTable | None:
    """The version's served replies beside the active version's and retrieval's, with examples (None: not scored)."""
    quality = (version.metrics or {}).get("quality") or {}
    rows = quality.get("rows") or {}
    if not rows.get("candidate"):
        return None
    columns = []
    for name in _QUALITY_COLUMNS:
        row = rows.get(name)
        if not row:
            continue
        label = f"{version.label} ({version.get_status_display().lower()})" if name == "candidate" else row["label"]
        columns.append(QualityColumn(name, label, row))

    def text(value: Any, digits: int = 3) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    def sources(row: dict[str, Any]) -> str:
        if row.get("name", "").startswith("retrieval"):
            return f"{row.get('retrieved', 0)} past answers"
        return f"{row.get('model_replies', 0)} model / {row.get('retrieved', 0)} past answers / " + (
            f"{row.get('handoffs', 0)} handoffs"
        )

    metrics = [
        ("ROUGE-L", [text(c.row.get("rouge_l")) for c in columns]),
        ("Intent accuracy", [text(c.row.get("intent_accuracy")) for c in columns]),
        ("Replies showing a template slot", [text(c.row.get("slot_leaks")) for c in columns]),
        ("Replies repeating themselves", [text(c.row.get("repeats")) for c in columns]),
        ("Replies sent", [sources(c.row) for c in columns]),
    ]
    count = max((len(c.row.get("examples") or []) for c in columns), default=0)
    examples = []
    for i in range(count):
        first = next(c.row["examples"][i] for c in columns if len(c.row.get("examples") or []) > i)
        replies = []
        for column in columns:
            items = column.row.get("examples") or []
            item = items[i] if i < len(items) else {}
            replies.append(
                {
                    "label": column.label,
                    "reply": item.get("reply", ""),
                    "source": item.get("source", ""),
                    "origin": item.get("origin", ""),
                }
            )
        examples.append(QualityExample(first.get("question", ""), first.get("reference", ""), replies))
    gate = ((version.gate_results or {}).get("gates") or {}).get("reply_quality")
    return QualityTable(
        columns=columns,
        metrics=metrics,
        examples=examples,
        examples_scored=int(rows["candidate"].get("n") or 0),
        grounded=bool(quality.get("grounded")),
        gate=gate,
    )


def bias_thresholds():
    """The alert rule's thresholds from settings (``SUPPORTBOT_BIAS_*``), for the dashboard and the probes."""
    from django.conf import settings

    from .ml.fairness import AlertThresholds

    return AlertThresholds(
        min_n=settings.SUPPORTBOT_BIAS_MIN_N,
        alpha=settings.SUPPORTBOT_BIAS_ALPHA,
        min_relative_gap=settings.SUPPORTBOT_BIAS_MIN_RELATIVE_GAP,
        ratio_low=settings.SUPPORTBOT_BIAS_RATIO_LOW,
        ratio_high=settings.SUPPORTBOT_BIAS_RATIO_HIGH,
    )


def ticket_replies_with_intent(*, limit: int = 20_000) -> tuple[list[str], list[str]]:
    """Agents' replies of historical tickets with the ticket's intent (newest tickets first, at most
    ``limit``): what an intent classifier of replies learns from when a version ships none."""
    rows = (
        TicketMessage.objects.filter(role=TicketMessage.Role.AGENT)
        .exclude(ticket__intent="")
        .order_by("-ticket_id", "-position")
        .values_list("ticket_id", "body", "ticket__intent")
    )
    seen: set[int] = set()
    replies: list[str] = []
    intents: list[str] = []
    for ticket_id, body, intent in rows.iterator(chunk_size=2000):
        if ticket_id in seen:
            continue  # the last agent turn of each ticket only
        seen.add(ticket_id)
        replies.append(body)
        intents.append(intent)
        if len(replies) >= limit:
            break
    return replies, intents


def bias_report_latest(version: ModelVersion):
    """The version's latest counterfactual-probe report (what its promotion gate reads), or None."""
    return version.bias_reports.order_by("-created_at", "-id").first()


def bias_report_table(report) -> dict[str, Any]:
    """A ``BiasReport`` as the version page shows it: one row per variant group with each measure's
    paired gap and interval (flagged ones marked), and per measure the worst group with examples."""
    data = report.report or {}
    measures: list[str] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for result in data.get("results", []):
        if result["measure"] not in measures:
            measures.append(result["measure"])
        row = rows.setdefault(
            (result["axis"], result["group"]), {"axis": result["axis"], "group": result["group"], "cells": {}}
        )
        interval = result.get("difference_interval") or {}
        row["cells"][result["measure"]] = {
            "difference": result.get("difference"),
            "low": interval.get("low"),
            "high": interval.get("high"),
            "p_adjusted": result.get("p_adjusted"),
            "flagged": bool((result.get("decision") or {}).get("alert")),
            "n": result.get("n"),
        }
    table = [{**row, "cells": [row["cells"].get(m) for m in measures]} for row in rows.values()]
    worst = [
        {
            "measure": w["measure"],
            "axis": w["axis"],
            "group": w["group"],
            "difference": w.get("difference"),
            "flagged": bool((w.get("decision") or {}).get("alert")),
            "examples": w.get("examples", [])[:2],
        }
        for w in data.get("worst", [])
    ]
    return {"measures": measures, "rows": table, "worst": worst}
