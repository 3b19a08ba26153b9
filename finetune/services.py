"""Write-side rules for tickets and datasets: importing ticket files and building dataset versions.

Both wrap plain-Python code (``finetune.importers``, ``finetune.dataset_builder``)
and record the result in the database; management commands, admin actions and
Celery tasks call these and nothing below them.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from supportbot.errors import ApplicationError

from . import selectors
from .base_model import BaseModelNotFound, resolve_base_model
from .dataset_builder import BuildOptions, build_dataset
from .importers import FORMATS, FormatError, ParsedTicket, RowError, read_tickets
from .models import DatasetVersion, Ticket, TicketMessage

log = logging.getLogger(__name__)

# Tickets written per transaction: large enough to amortise round trips, small
# enough that a crash loses little and memory stays flat.
IMPORT_BATCH_SIZE = 500
# Problems kept in the summary; all of them go to ``on_problem`` as they happen.
MAX_PROBLEMS_KEPT = 100
PARALLEL_BUILD_MIN_TICKETS = 10_000
MAX_BUILD_WORKERS = 2  # measured on two cores; the main process (reads, dedup, Arrow writes) limits beyond
DEFAULT_MAX_LENGTH = 512  # tokens per example; ticket threads rarely exceed it (see the card's percentiles)

_TICKET_FIELDS = (
    "subject",
    "category",
    "intent",
    "language",
    "tags",
    "customer_segment",
    "customer_name",
    "customer_email",
    "customer_phone",
    "customer_address",
    "customer_identifiers",
    "metadata",
)


# --- import ------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    path: str
    format: str
    source: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    problems: list[RowError] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT
    warnings: list[str] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return self.created + self.updated + self.unchanged


def _ticket_values(parsed: ParsedTicket, *, run_id: str, file_name: str) -> dict:
    values = {name: getattr(parsed, name) for name in _TICKET_FIELDS}
    values["metadata"] = {
        **parsed.metadata,
        # Where the row came from, and a fingerprint to recognise an unchanged re-import.
        "_import": {"file": file_name, "line": parsed.line, "run": run_id, "sha256": parsed.fingerprint()},
    }
    if parsed.created_at is not None:
        values["created_at"] = parsed.created_at
    values["resolved_at"] = parsed.resolved_at
    return values


def _write_batch(
    batch: list[ParsedTicket], *, source: str, run_id: str, file_name: str, summary: ImportSummary
) -> None:
    """Upsert one batch of tickets (with their messages) in one transaction."""
    with transaction.atomic():
        existing = {
            ticket.external_id: ticket
            for ticket in Ticket.objects.filter(source=source, external_id__in=[p.external_id for p in batch]).only(
                "id", "external_id", "metadata", "created_at"
            )
        }
        new: list[Ticket] = []
        changed: list[Ticket] = []
        threads: list[tuple[Ticket, ParsedTicket]] = []
        now = timezone.now()
        for parsed in batch:
            values = _ticket_values(parsed, run_id=run_id, file_name=file_name)
            ticket = existing.get(parsed.external_id)
            if ticket is None:
                ticket = Ticket(source=source, external_id=parsed.external_id, **values)
                new.append(ticket)
                threads.append((ticket, parsed))
                continue
            previous = (ticket.metadata or {}).get("_import", {})
            if previous.get("run") == run_id:
                summary.warnings.append(
                    f"line {parsed.line}: external id {parsed.external_id!r} also appears on line "
                    f"{previous.get('line')}; this later row replaced it"
                )
            elif previous.get("sha256") == values["metadata"]["_import"]["sha256"]:
                summary.unchanged += 1
                continue
            for name, value in values.items():
                setattr(ticket, name, value)
            ticket.updated_at = now  # bulk_update does not apply auto_now
            changed.append(ticket)
            threads.append((ticket, parsed))
        Ticket.objects.bulk_create(new)
        if changed:
            Ticket.objects.bulk_update(changed, [*_TICKET_FIELDS, "created_at", "resolved_at", "updated_at"])
            TicketMessage.objects.filter(ticket__in=changed).delete()
        TicketMessage.objects.bulk_create(
            TicketMessage(ticket=ticket, role=message.role, body=message.body, position=position)
            for ticket, parsed in threads
            for position, message in enumerate(parsed.messages)
        )
    summary.created += len(new)
    summary.updated += len(changed)


def ticket_import(
    *,
    path: str | Path,
    fmt: str,
    source: str | None = None,
    field_map: dict[str, str] | None = None,
    batch_size: int = IMPORT_BATCH_SIZE,
    on_progress: Callable[[int], None] | None = None,
    on_problem: Callable[[RowError], None] | None = None,
) -> ImportSummary:
    """Import a ticket file, upserting on (source, external id); return what happened.

    Broken records are skipped and reported (``on_problem`` gets each as it is
    found); the rest import. A file that is not ``fmt`` raises ApplicationError
    before anything is written. Each batch commits on its own, so an interrupted
    import keeps what it wrote and running it again finishes the job.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ApplicationError(f"Unknown format {fmt!r}; use one of: {', '.join(FORMATS)}.", code="bad_format")
    if not path.is_file():
        raise ApplicationError(f"{path} does not exist or is not a file.", code="not_found")
    source = (source or ("bitext" if fmt == "bitext" else path.stem)).strip()
    if not source or len(source) > 64:
        raise ApplicationError("The source name must be 1 to 64 characters (use --source NAME).", code="invalid")
    summary = ImportSummary(path=str(path), format=fmt, source=source)
    run_id = uuid.uuid4().hex
    batch: list[ParsedTicket] = []
    batch_ids: set[str] = set()

    def flush() -> None:
        if batch:
            _write_batch(batch, source=source, run_id=run_id, file_name=path.name, summary=summary)
            batch.clear()
            batch_ids.clear()

    try:
        for item in read_tickets(path, fmt, field_map=field_map, on_progress=on_progress):
            if isinstance(item, RowError):
                summary.skipped += 1
                summary.skipped_by_reason[item.code] += 1
                if len(summary.problems) < MAX_PROBLEMS_KEPT:
                    summary.problems.append(item)
                if on_problem is not None:
                    on_problem(item)
                continue
            # A repeated id inside one batch would collide in bulk_create: write what
            # came before, so the later row updates it exactly as across batches.
            if item.external_id in batch_ids:
                flush()
            batch.append(item)
            batch_ids.add(item.external_id)
            if len(batch) >= batch_size:
                flush()
        flush()
    except FormatError as exc:
        raise ApplicationError(f"{path.name}: {exc} Nothing was imported.", code="bad_format") from exc
    except ValueError as exc:  # a bad --map or format option, found before reading
        raise ApplicationError(str(exc), code="invalid") from exc
    log.info(
        "Imported %s (%s, source %r): %d created, %d updated, %d unchanged, %d skipped",
        path.name,
        fmt,
        source,
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.skipped,
    )
    return summary


# --- datasets ------------------------------------------------------------------------------


def _unique_name(base: str) -> str:
    name, counter = base, 1
    while DatasetVersion.objects.filter(name=name).exists():
        counter += 1
        name = f"{base}-{counter}"
    return name


def _load_tokenizer(spec: str):
    try:
        resolved = resolve_base_model(spec, settings.SUPPORTBOT_MODEL_STORE)
    except BaseModelNotFound as exc:
        raise ApplicationError(str(exc), code="no_base_model") from exc
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError) as exc:
        raise ApplicationError(
            f"The tokenizer of base model {resolved.name!r} ({resolved.path}) could not be loaded: {exc}",
            code="no_base_model",
        ) from exc
    return resolved, tokenizer


def _auto_workers(tickets: int) -> int:
    """Worker processes for a build of ``tickets``: one per core for big builds, none for small ones.

    A worker takes seconds to start (it imports transformers), which only pays off
    over many thousands of tickets (docs/benchmarks.md, "Dataset build").
    """
    if tickets < PARALLEL_BUILD_MIN_TICKETS:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_BUILD_WORKERS))


def dataset_conversations(
    *, since: datetime | None, include_feedback: bool, sources: Sequence[str] | None = None
) -> Iterable:
    """Tickets first, then agent feedback: the input of every dataset build."""
    tickets = selectors.ticket_conversations(since=since, sources=sources)
    if not include_feedback:
        return tickets
    return chain(tickets, selectors.training_examples_from_feedback(since=since))


def dataset_version_build(
    *,
    out_dir: str | Path | None = None,
    since: datetime | None = None,
    sources: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    base_model: str | None = None,
    include_feedback: bool = True,
    system_prompt: bool = True,
    workers: int | None = None,
    created_by=None,
    progress: Callable[[int], None] | None = None,
) -> DatasetVersion:
    """Build a dataset from the tickets (and agent feedback) and record it as a DatasetVersion.

    ``sources`` limits the tickets to those import sources (all when empty).

    Without ``out_dir`` the dataset goes to ``SUPPORTBOT_DATASET_DIR/dataset-<time>``;
    if its content is identical to a recorded version whose folder still exists,
    that version is returned and the new copy removed, so repeating a build does
    not pile up identical datasets.
    """
    if not 0 <= val_fraction < 1:
        raise ApplicationError(f"--val-fraction must be at least 0 and below 1, not {val_fraction}.")
    if max_examples is not None and max_examples < 1:
        raise ApplicationError(f"--max-examples must be at least 1, not {max_examples}.")
    if max_length < 32:
        raise ApplicationError(f"--max-length must be at least 32 tokens, not {max_length}.")
    if seed < 0:
        raise ApplicationError(f"--seed must be zero or positive, not {seed}.")
    if since is not None and timezone.is_naive(since):
        since = timezone.make_aware(since, timezone.get_current_timezone())

    explicit_out = out_dir is not None
    if explicit_out:
        out = Path(out_dir).expanduser().resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ApplicationError(f"{out} already exists and is not empty; choose another --out.", code="exists")
        name = _unique_name(out.name)
    else:
        name = _unique_name(f"dataset-{timezone.now():%Y%m%d-%H%M%S}")
        out = Path(settings.SUPPORTBOT_DATASET_DIR) / name
        while out.exists():
            name = _unique_name(name + "-1")
            out = Path(settings.SUPPORTBOT_DATASET_DIR) / name

    if workers is None:
        workers = _auto_workers(selectors.ticket_count(since=since, sources=sources))
    if workers < 1:
        raise ApplicationError(f"--workers must be at least 1, not {workers}.")

    resolved, tokenizer = _load_tokenizer(base_model or settings.SUPPORTBOT_BASE_MODEL)
    built_by = getattr(created_by, "username", None) or f"{getpass.getuser()} (command line)"
    options = BuildOptions(
        out_dir=out,
        tokenizer_name=resolved.name,
        system_prompt=selectors.training_system_prompt() if system_prompt else None,
        val_fraction=val_fraction,
        seed=seed,
        max_examples=max_examples,
        max_length=max_length,
        workers=workers,
        params={
            "since": since.isoformat() if since else None,
            "sources": list(sources) if sources else None,
            "include_feedback": include_feedback,
            "system_prompt": system_prompt,
            "base_model": resolved.name,
            "built_by": built_by,
            "workers": workers,
        },
    )
    try:
        summary = build_dataset(
            dataset_conversations(since=since, include_feedback=include_feedback, sources=sources),
            tokenizer,
            options,
            progress=progress,
        )
    except FileExistsError as exc:
        raise ApplicationError(str(exc), code="exists") from exc
    except ValueError as exc:
        raise ApplicationError(str(exc), code="empty") from exc

    if not explicit_out:
        same = (
            DatasetVersion.objects.filter(content_hash=summary.content_hash, tokenizer=resolved.name)
            .order_by("-created_at")
            .first()
        )
        if same is not None and Path(same.path).is_dir():
            shutil.rmtree(summary.path, ignore_errors=True)
            log.info("Dataset identical to %s (%s); reusing it", same.name, summary.content_hash[:12])
            return same

    version = DatasetVersion.objects.create(
        name=name,
        path=str(summary.path),
        content_hash=summary.content_hash,
        tokenizer=resolved.name,
        num_train=summary.num_train,
        num_validation=summary.num_validation,
        params=summary.card["params"],
        card=summary.card,
        created_by=created_by,
    )
    log.info("Dataset %s: %d train, %d validation at %s", name, version.num_train, version.num_validation, out)
    return version
