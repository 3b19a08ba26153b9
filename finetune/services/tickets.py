"""Importing historical tickets: ``ticket_import`` streams a file into ``Ticket`` rows.

Rows are upserted on (source, external id), so importing the same file again
changes nothing; broken records are skipped and reported by line. Reading the file
is plain Python (``finetune.ml.importers``); this module writes what it yields.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.db import reset_queries, transaction
from django.utils import timezone

from finetune.ml.importers import FORMATS, TICKET_FIELDS, FormatError, ParsedTicket, RowError, read_tickets
from finetune.ml.segments import SEGMENTER_VERSION, ticket_segments
from finetune.models import Ticket, TicketMessage
from supportbot.errors import ApplicationError

log = logging.getLogger(__name__)

# Tickets written per transaction: large enough to amortise round trips, small
# enough that a crash loses little and memory stays flat.
IMPORT_BATCH_SIZE = 500
# Problems kept in the summary; all of them go to ``on_problem`` as they happen.
MAX_PROBLEMS_KEPT = 100

# The fields an import writes as they are (the id identifies the row; the dates may be absent).
_TICKET_FIELDS = tuple(name for name in TICKET_FIELDS if name not in {"external_id", "created_at", "resolved_at"})
# Segment labels set on import (finetune.ml.segments.ticket_segments).
_SEGMENT_FIELDS = ("registers", "register", "register_source", "segmenter_version")


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
    warnings: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT
    repeated_ids: int = 0  # rows whose external id an earlier row of the same file had

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
    first_customer = next((m.body for m in parsed.messages if m.role == TicketMessage.Role.CUSTOMER), "")
    values.update(ticket_segments(parsed.tags, first_customer))
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
                summary.repeated_ids += 1
                if len(summary.warnings) < MAX_PROBLEMS_KEPT:
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
            written = [*_TICKET_FIELDS, *_SEGMENT_FIELDS, "created_at", "resolved_at", "updated_at"]
            Ticket.objects.bulk_update(changed, written)
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
        raise ApplicationError("The source name must be 1 to 64 characters.", code="invalid", extra={"field": "source"})
    summary = ImportSummary(path=str(path), format=fmt, source=source)
    run_id = uuid.uuid4().hex
    batch: list[ParsedTicket] = []
    batch_ids: set[str] = set()

    def flush() -> None:
        if batch:
            _write_batch(batch, source=source, run_id=run_id, file_name=path.name, summary=summary)
            batch.clear()
            batch_ids.clear()
            # With DEBUG on (the default outside production) Django keeps the SQL of up to
            # 9,000 queries, here with every ticket's text in it: memory would grow with
            # the file (~200 MB more per 128 MB of tickets) instead of staying flat.
            reset_queries()

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


def tickets_segment_label(*, relabel: bool = False, batch_size: int = IMPORT_BATCH_SIZE) -> int:
    """Label tickets imported before segment labels existed (or, with ``relabel``, whose labels an
    older segmenter made); returns how many were labelled. Safe to run again."""
    pending = Ticket.objects.filter(segmenter_version__isnull=True)
    if relabel:
        pending = Ticket.objects.exclude(segmenter_version=SEGMENTER_VERSION)
    done = 0
    last_id = 0
    while True:
        tickets = list(pending.filter(pk__gt=last_id).order_by("pk").only("id", "tags")[:batch_size])
        if not tickets:
            return done
        firsts: dict[int, str] = {}
        for ticket_id, body in (
            TicketMessage.objects.filter(ticket__in=tickets, role=TicketMessage.Role.CUSTOMER)
            .order_by("ticket_id", "-position")
            .values_list("ticket_id", "body")
        ):
            firsts[ticket_id] = body  # ordered by descending position: the first customer turn wins
        for ticket in tickets:
            for name, value in ticket_segments(ticket.tags or [], firsts.get(ticket.pk, "")).items():
                setattr(ticket, name, value)
        with transaction.atomic():
            Ticket.objects.bulk_update(tickets, list(_SEGMENT_FIELDS))
        done += len(tickets)
        last_id = tickets[-1].pk
