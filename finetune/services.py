"""Write-side rules of fine-tuning: tickets, datasets, training runs and model versions.

Interfaces (the admin, management commands, the Celery task) call these and nothing
below them. The heavy lifting is plain Python (``finetune.importers``,
``finetune.dataset_builder``, ``finetune.training``); these record it in the database.

- ``ticket_import``: stream a ticket file into ``Ticket`` rows (upsert on source +
  external id), reporting broken rows by line.
- ``dataset_version_build``: redact, deduplicate, split and save a dataset, recorded
  as a ``DatasetVersion``.

- ``training_run_request``: one live run per lane (a partial unique constraint plus a
  lock), validated settings, queued on the broker after commit.
- ``training_run_execute``: what the worker runs: claims the run (idempotent per run id,
  so a redelivered task never runs a finished run again), trains with
  ``finetune.training.train_lora``, records progress and a heartbeat, creates the
  candidate ``ModelVersion``, and promotes it when it passes the gates and the run
  asked for that. A failure never touches the active version.
- ``training_run_cancel``, ``training_runs_reap_stale`` (a worker that died).
- ``model_version_promote`` / ``model_version_rollback``: one transaction each;
  after commit, running chat servers are told to reload through the channel layer
  (group ``MODEL_EVENTS_GROUP``, event ``MODEL_CHANGED_EVENT``).
- ``promotion_gate_register``: gates a candidate must pass before automatic promotion
  (validation loss no worse than the active version's on the same validation set;
  other apps register more). A manual promotion over a failed gate needs a reason and
  is recorded with who gave it.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, reset_queries, transaction
from django.db.models import Max, Q
from django.utils import timezone

from supportbot.errors import ApplicationError

from . import selectors
from .base_model import BaseModelNotFound, resolve_base_model
from .dataset_builder import BuildOptions, build_dataset
from .importers import FORMATS, FormatError, ParsedTicket, RowError, read_tickets
from .models import DatasetVersion, ModelVersion, ModelVersionEvent, Ticket, TicketMessage, TrainingRun

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


log = logging.getLogger(__name__)

# Chat servers join this channel-layer group and reload their model on this event.
MODEL_EVENTS_GROUP = "models"
MODEL_CHANGED_EVENT = "model.changed"

DEFAULT_LANE = "default"

# Settings an admin may choose per run; the rest of TrainConfig is fixed by the code.
REQUESTABLE_SETTINGS = (
    "epochs",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "max_examples",
    "max_length",
    "batch_size",
    "grad_accum_steps",
    "warmup_ratio",
    "seed",
    "max_eval_examples",
    "eval_generate_samples",
    "eval_max_new_tokens",
)
LOG_TAIL_LINES = 60


# --- helpers ----------------------------------------------------------------------------


def _lock(name: str) -> None:
    """Serialise a critical section across processes (PostgreSQL advisory lock, held to commit).

    SQLite takes a database-wide write lock on the first write, and the constraints
    below catch anything that slips through, so it needs nothing more.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"supportbot:{name}"])


def _model_store() -> Path:
    return Path(settings.SUPPORTBOT_MODEL_STORE).resolve()


def _run_dir(run_id: int) -> Path:
    return _model_store() / "runs" / str(run_id)


def _remove_run_files(path: str | Path | None) -> None:
    """Delete a run's working directory, and never anything outside the store's runs/ folder."""
    if not path:
        return
    target = Path(path).resolve()
    runs = _model_store() / "runs"
    if runs not in target.parents:
        log.warning("Not removing %s: it is outside %s", target, runs)
        return
    shutil.rmtree(target, ignore_errors=True)


def _run_log_append(run_id: int, line: str) -> None:
    """Add a line to a run's log tail whatever its status (used after it has finished)."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return
        lines = (run.log_tail.splitlines() + [_stamp(line)])[-LOG_TAIL_LINES:]
        run.log_tail = "\n".join(lines)
        run.save(update_fields=["log_tail"])


def _stamp(line: str) -> str:
    return f"{timezone.now():%H:%M:%S} {line}"


# --- requesting, cancelling and reaping runs ----------------------------------------------------


def training_settings_validate(hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """The full set of per-run settings (defaults filled in), or ApplicationError saying what is wrong."""
    from .training import TrainConfig

    overrides = {k: v for k, v in (hyperparameters or {}).items() if v is not None and v != ""}
    unknown = sorted(set(overrides) - set(REQUESTABLE_SETTINGS))
    if unknown:
        raise ApplicationError(
            f"Unknown training settings: {', '.join(unknown)}. Allowed: {', '.join(REQUESTABLE_SETTINGS)}.",
            code="invalid_settings",
        )
    try:
        config = TrainConfig.from_overrides(overrides)
    except ValueError as exc:
        raise ApplicationError(str(exc), code="invalid_settings") from exc
    return {name: getattr(config, name) for name in REQUESTABLE_SETTINGS}


def training_run_request(
    *,
    actor=None,
    dataset_version: DatasetVersion | None = None,
    build_fresh: bool = False,
    hyperparameters: dict[str, Any] | None = None,
    auto_promote: bool = True,
    lane: str = DEFAULT_LANE,
    enqueue: bool = True,
) -> TrainingRun:
    """Queue a training run, or refuse with a message if one is already queued or running.

    Without a dataset version and without ``build_fresh`` the newest dataset is used.
    ``enqueue=False`` leaves the run for the caller to execute (``manage.py finetune``).
    """
    chosen = training_settings_validate(hyperparameters)
    if build_fresh:
        dataset_version = None
    elif dataset_version is None:
        dataset_version = DatasetVersion.objects.order_by("-created_at", "-id").first()
        if dataset_version is None:
            raise ApplicationError(
                "There is no dataset yet. Build one with `python manage.py build_dataset` "
                "(or choose 'build fresh'), then retrain.",
                code="no_dataset",
            )
    if dataset_version is not None and not Path(dataset_version.path).is_dir():
        raise ApplicationError(
            f"The files of dataset {dataset_version.name} are missing ({dataset_version.path}). "
            "Rebuild the dataset or choose another version.",
            code="dataset_missing",
        )
    # A run whose worker died would otherwise block the lane until someone notices.
    training_runs_reap_stale()
    with transaction.atomic():
        _lock(f"training-lane:{lane}")
        live = TrainingRun.objects.filter(lane=lane, status__in=TrainingRun.LIVE_STATUSES).first()
        if live is not None:
            raise _run_in_progress(live)
        try:
            with transaction.atomic():
                run = TrainingRun.objects.create(
                    lane=lane,
                    status=TrainingRun.Status.QUEUED,
                    dataset_version=dataset_version,
                    build_fresh_dataset=build_fresh,
                    hyperparameters={**chosen, "auto_promote": bool(auto_promote)},
                    requested_by=actor if getattr(actor, "pk", None) else None,
                    celery_task_id=uuid.uuid4().hex if enqueue else "",
                    log_tail=_stamp(f"Queued by {_actor_name(actor)}"),
                )
        except IntegrityError:
            # Another request won the race between the check above and this insert.
            live = TrainingRun.objects.filter(lane=lane, status__in=TrainingRun.LIVE_STATUSES).first()
            raise _run_in_progress(live) from None
        if enqueue:
            transaction.on_commit(partial(_training_run_enqueue, run.pk, run.celery_task_id))
    return run


def _run_in_progress(live: TrainingRun | None) -> ApplicationError:
    what = f"Run #{live.pk} is already {live.get_status_display().lower()}" if live else "A run is already live"
    return ApplicationError(
        f"{what}; only one training run at a time. Wait for it to finish or cancel it, then retrain.",
        code="run_in_progress",
        extra={"run_id": live.pk if live else None},
    )


def _actor_name(actor) -> str:
    return getattr(actor, "username", "") or "the system"


def _training_run_enqueue(run_id: int, task_id: str) -> None:
    from kombu.exceptions import OperationalError

    from .tasks import retrain

    options: dict[str, Any] = {
        "task_id": task_id,
        # Enforced by Celery's prefork pool; with --pool=solo the task enforces them itself.
        "soft_time_limit": settings.SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT,
        "time_limit": settings.SUPPORTBOT_TRAINING_TIME_LIMIT,
    }
    if settings.SUPPORTBOT_TRAINING_QUEUE:
        options["queue"] = settings.SUPPORTBOT_TRAINING_QUEUE
    try:
        retrain.apply_async(args=[run_id], **options)
    except (OperationalError, OSError) as exc:
        # Left queued, the run would look alive forever and block the lane.
        TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
            status=TrainingRun.Status.FAILED,
            finished_at=timezone.now(),
            error=f"The task queue could not be reached ({exc}). Check that Redis (REDIS_URL) is up, then retrain.",
        )


def training_run_cancel(*, run: TrainingRun, actor=None) -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop at its next step."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        who = _actor_name(actor)
        if run.status == TrainingRun.Status.QUEUED:
            run.status = TrainingRun.Status.CANCELLED
            run.cancel_requested = True
            run.finished_at = timezone.now()
            run.log_tail = "\n".join([*run.log_tail.splitlines(), _stamp(f"Cancelled by {who} before it started")])
            run.save(update_fields=["status", "cancel_requested", "finished_at", "log_tail"])
        elif run.status == TrainingRun.Status.RUNNING:
            if not run.cancel_requested:
                run.cancel_requested = True
                run.log_tail = "\n".join([*run.log_tail.splitlines(), _stamp(f"Cancel requested by {who}")])
                run.save(update_fields=["cancel_requested", "log_tail"])
        else:
            raise ApplicationError(
                f"Run #{run.pk} has already {run.get_status_display().lower()}; there is nothing to cancel.",
                code="run_finished",
            )
    return run


def training_runs_reap_stale(*, stale_after: timedelta | None = None) -> list[TrainingRun]:
    """Mark running runs whose worker stopped sending heartbeats as failed, and delete their files.

    The active model version is never touched: a run only ever changes it by
    promoting its own version, which a dead run never got to.
    """
    if stale_after is None:
        stale_after = timedelta(seconds=settings.SUPPORTBOT_TRAINING_STALE_AFTER)
    cutoff = timezone.now() - stale_after
    stale = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    reaped: list[TrainingRun] = []
    for run_id in TrainingRun.objects.filter(stale, status=TrainingRun.Status.RUNNING).values_list("pk", flat=True):
        with transaction.atomic():
            run = TrainingRun.objects.select_for_update().filter(stale, pk=run_id, status="running").first()
            if run is None:
                continue  # it sent a heartbeat meanwhile, or someone else reaped it
            _mark_failed(run, _worker_lost_message(run))
            transaction.on_commit(partial(_remove_run_files, run.output_dir))
        reaped.append(run)
        log.warning("Training run #%s failed: its worker stopped sending heartbeats", run.pk)
    return reaped


def _worker_lost_message(run: TrainingRun) -> str:
    seen = f"{run.heartbeat_at:%Y-%m-%d %H:%M:%S %Z}" if run.heartbeat_at else "never"
    return (
        f"The worker running this run stopped responding (last heartbeat: {seen}); it was probably killed or "
        "ran out of memory. Its files were removed and the active model is unchanged. Retrain to try again."
    )


def _mark_failed(run: TrainingRun, message: str) -> None:
    run.status = TrainingRun.Status.FAILED
    run.error = message
    run.finished_at = timezone.now()
    run.log_tail = "\n".join([*run.log_tail.splitlines(), _stamp(f"Failed: {message}")][-LOG_TAIL_LINES:])
    run.save(update_fields=["status", "error", "finished_at", "log_tail"])


def _finish_if_running(run_id: int, status: str, error: str = "", line: str = "") -> bool:
    """Move a running run to a final status, unless the reaper or a time limit already did."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id, status=TrainingRun.Status.RUNNING).first()
        if run is None:
            return False
        run.status = status
        run.error = error
        run.finished_at = timezone.now()
        lines = run.log_tail.splitlines() + ([_stamp(line)] if line else [])
        run.log_tail = "\n".join(lines[-LOG_TAIL_LINES:])
        run.save(update_fields=["status", "error", "finished_at", "log_tail"])
    return True


# --- executing a run ----------------------------------------------------------------------------


class _Watchdog(threading.Thread):
    """Heartbeat, cancel and hard-time-limit checks, off the training thread.

    It writes ``heartbeat_at`` every interval and raises a flag the training loop
    reads at each step when the run was cancelled, failed by someone else (the
    reaper), or ran past its hard time limit. It dies with the process, so a killed
    worker stops heartbeating, which is how the reaper knows.
    """

    def __init__(self, run_id: int, interval: float, hard_deadline: float | None, hard_limit: int | None):
        super().__init__(name=f"training-run-{run_id}-watchdog", daemon=True)
        self.run_id = run_id
        self.interval = interval
        self.hard_deadline = hard_deadline
        self.hard_limit = hard_limit
        self.finished = threading.Event()
        self.halt = threading.Event()
        self.reason = ""

    def run(self) -> None:
        try:
            while not self.finished.wait(self.interval):
                try:
                    self._beat()
                except DatabaseError:
                    log.exception("Heartbeat of training run #%s failed; retrying", self.run_id)
        finally:
            connection.close()  # this thread's own connection

    def _beat(self) -> None:
        if self.hard_deadline is not None and time.monotonic() > self.hard_deadline:
            self.reason = "hard_time_limit"
            _finish_if_running(
                self.run_id,
                TrainingRun.Status.FAILED,
                f"The run exceeded the hard time limit of {self.hard_limit} s (SUPPORTBOT_TRAINING_TIME_LIMIT) and "
                "was stopped. Lower epochs or max examples, or raise the limit. The active model is unchanged.",
            )
            self.halt.set()
            return
        row = TrainingRun.objects.filter(pk=self.run_id).values("status", "cancel_requested").first()
        if row is None or row["status"] != TrainingRun.Status.RUNNING:
            self.reason = self.reason or "not_running"
            self.halt.set()
            return
        if row["cancel_requested"]:
            self.reason = "cancel"
            self.halt.set()
        TrainingRun.objects.filter(pk=self.run_id, status=TrainingRun.Status.RUNNING).update(
            heartbeat_at=timezone.now()
        )

    def stop(self) -> None:
        self.finished.set()
        if self.is_alive():
            self.join(timeout=self.interval + 5)


class _ProgressRecorder:
    """Receives the trainer's ProgressEvents and writes them to the run row, at most ~2 per second.

    Log lines are appended to what the row holds at write time, so lines written by
    others meanwhile (a cancel request) are kept.
    """

    MIN_INTERVAL = 0.5

    def __init__(self, run: TrainingRun, echo: Callable[[Any], None] | None = None):
        self.run_id = run.pk
        self.echo = echo
        self.pending: list[str] = []
        self.loss_history: list[dict[str, float]] = []
        self.state: dict[str, Any] = {}
        self.last_write = 0.0
        self.phase = ""

    def note(self, line: str) -> None:
        self.pending.append(_stamp(line))
        self.flush()

    def __call__(self, event) -> None:
        if self.echo is not None:
            self.echo(event)
        self.state = {
            "progress": event.progress,
            "current_step": event.step,
            "total_steps": event.total_steps,
            "current_epoch": event.epoch,
        }
        important = event.phase != self.phase or event.phase == "done"
        self.phase = event.phase
        if event.loss is not None:
            self.loss_history.append({"step": event.step, "epoch": event.epoch, "loss": round(event.loss, 5)})
        if event.message:
            self.pending.append(_stamp(event.message))
        # Each write is a committed transaction (an fsync on SQLite): a tiny model's
        # 10 ms steps must not each wait for one.
        if important or time.monotonic() - self.last_write >= self.MIN_INTERVAL:
            self.flush()

    def flush(self) -> None:
        self.last_write = time.monotonic()
        with transaction.atomic():
            run = TrainingRun.objects.select_for_update().filter(pk=self.run_id, status="running").first()
            if run is None:
                return  # finished meanwhile (cancelled, reaped): its row is final
            for name, value in self.state.items():
                setattr(run, name, value)
            run.loss_history = self.loss_history
            run.log_tail = "\n".join((run.log_tail.splitlines() + self.pending)[-LOG_TAIL_LINES:])
            run.heartbeat_at = timezone.now()
            run.save(update_fields=[*self.state, "loss_history", "log_tail", "heartbeat_at"])
        self.pending = []


def _training_run_claim(run_id: int, task_id: str) -> TrainingRun | None:
    """Move a queued run to running; None (and nothing done) for any other state.

    This is the idempotency guard: Celery redelivers an acks_late task whose worker
    died, and the message must not run a finished, cancelled or reaped run again.
    """
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            log.warning("Training run #%s does not exist; nothing to do", run_id)
            return None
        if run.status == TrainingRun.Status.QUEUED:
            if run.cancel_requested:
                run.status = TrainingRun.Status.CANCELLED
                run.finished_at = timezone.now()
                run.save(update_fields=["status", "finished_at"])
                return None
            now = timezone.now()
            run.status = TrainingRun.Status.RUNNING
            run.started_at = now
            run.heartbeat_at = now
            run.celery_task_id = task_id or run.celery_task_id
            run.output_dir = str(_run_dir(run.pk))
            run.log_tail = "\n".join([*run.log_tail.splitlines(), _stamp("Started")])
            run.save(update_fields=["status", "started_at", "heartbeat_at", "celery_task_id", "output_dir", "log_tail"])
            return run
        if run.status == TrainingRun.Status.RUNNING:
            cutoff = timezone.now() - timedelta(seconds=settings.SUPPORTBOT_TRAINING_STALE_AFTER)
            if run.heartbeat_at is None or run.heartbeat_at < cutoff:
                # Delivered again after its worker died: the first attempt is over.
                _mark_failed(run, _worker_lost_message(run))
                transaction.on_commit(partial(_remove_run_files, run.output_dir))
            else:
                log.warning("Training run #%s is running elsewhere (fresh heartbeat); not starting it twice", run_id)
            return None
        log.info("Training run #%s is already %s; a repeated delivery does nothing", run_id, run.status)
        return None


def training_run_execute(
    *,
    run_id: int,
    task_id: str = "",
    on_progress: Callable[[Any], None] | None = None,
    soft_time_limit: int | None = None,
    time_limit: int | None = None,
) -> TrainingRun:
    """Run a queued training run to its end (succeeded, failed or cancelled) and return it.

    Idempotent per run id: any run that is not queued is left as it is. Expected
    failures (bad dataset, missing base model, time limit) end the run as failed
    with a message saying what to do; the active version is never touched by a
    failure.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    from .base_model import BaseModelNotFound, resolve_base_model
    from .training import DatasetError, TrainConfig, TrainingCancelled, train_lora

    run = _training_run_claim(run_id, task_id)
    if run is None:
        return TrainingRun.objects.get(pk=run_id)

    soft = soft_time_limit or settings.SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT
    hard = time_limit or settings.SUPPORTBOT_TRAINING_TIME_LIMIT
    started = time.monotonic()
    watchdog = _Watchdog(run.pk, float(settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL), started + hard, hard)
    watchdog.start()
    recorder = _ProgressRecorder(run, on_progress)
    stop_reason = ""

    def should_stop() -> bool:
        nonlocal stop_reason
        if watchdog.halt.is_set():
            stop_reason = watchdog.reason
            return True
        if time.monotonic() - started > soft:
            stop_reason = "soft_time_limit"
            return True
        return False

    version: ModelVersion | None = None
    try:
        dataset = _training_dataset(run, recorder)
        resolved = resolve_base_model(settings.SUPPORTBOT_BASE_MODEL, _model_store())
        TrainingRun.objects.filter(pk=run.pk).update(base_model=resolved.name)
        run.base_model = resolved.name
        recorder.note(f"Base model: {resolved.name} ({resolved.path}); dataset: {dataset.name}")
        requested = {k: v for k, v in run.hyperparameters.items() if k in REQUESTABLE_SETTINGS}
        config = TrainConfig.from_overrides(requested, base_model=resolved.path, base_model_name=resolved.name)
        result = train_lora(config, dataset.path, _run_dir(run.pk), recorder, should_stop=should_stop)
        metrics = dict(result.metrics)
        metrics["reference_losses"] = _reference_losses(run, dataset, config, metrics, recorder)
        if should_stop():
            raise TrainingCancelled("stopped after training")
        version = _model_version_create(run=run, dataset=dataset, result=result, metrics=metrics)
    except TrainingCancelled:
        if stop_reason == "cancel":
            _finish_if_running(run.pk, TrainingRun.Status.CANCELLED, line="Cancelled; files removed")
        elif stop_reason == "soft_time_limit":
            _finish_if_running(run.pk, TrainingRun.Status.FAILED, _soft_limit_message(soft))
        _remove_run_files(_run_dir(run.pk))
    except SoftTimeLimitExceeded:
        _finish_if_running(run.pk, TrainingRun.Status.FAILED, _soft_limit_message(soft))
        _remove_run_files(_run_dir(run.pk))
    except (ApplicationError, BaseModelNotFound, DatasetError, FloatingPointError, ValueError) as exc:
        _finish_if_running(run.pk, TrainingRun.Status.FAILED, str(exc), line=f"Failed: {exc}")
        _remove_run_files(_run_dir(run.pk))
    except Exception as exc:
        # Anything else is a bug or the machine (out of memory, disk full): record it
        # on the run for the admin, keep the traceback in the worker log.
        log.exception("Training run #%s failed", run.pk)
        message = f"{type(exc).__name__}: {exc}. The worker log has the details; the active model is unchanged."
        _finish_if_running(run.pk, TrainingRun.Status.FAILED, message, line=f"Failed: {message}")
        _remove_run_files(_run_dir(run.pk))
    finally:
        watchdog.stop()

    if version is not None and run.hyperparameters.get("auto_promote", True):
        if version.gate_results.get("passed"):
            try:
                model_version_promote(version=version, automatic=True)
                _run_log_append(run.pk, f"{version.label} passed the gates and is now active")
            except ApplicationError as exc:
                _run_log_append(run.pk, f"{version.label} was not promoted: {exc}")
        else:
            _run_log_append(run.pk, f"{version.label} stays a candidate: {gate_failures_text(version.gate_results)}")
    return TrainingRun.objects.get(pk=run.pk)


def _soft_limit_message(soft: int) -> str:
    return (
        f"The run exceeded the soft time limit of {soft} s (SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT) and was stopped. "
        "Lower epochs or max examples, or raise the limit. The active model is unchanged."
    )


def _training_dataset(run: TrainingRun, recorder: _ProgressRecorder) -> DatasetVersion:
    if not run.build_fresh_dataset:
        if run.dataset_version is None:
            raise ApplicationError("The run has no dataset version; retrain and choose one.", code="no_dataset")
        return run.dataset_version
    recorder.note("Building a fresh dataset")
    # An identical build returns the existing version instead of a copy.
    dataset = dataset_version_build(created_by=run.requested_by)
    TrainingRun.objects.filter(pk=run.pk).update(dataset_version=dataset)
    run.dataset_version = dataset
    recorder.note(f"Built dataset {dataset.name}: {dataset.num_train} train / {dataset.num_validation} validation")
    return dataset


def _reference_losses(run, dataset, config, metrics, recorder) -> dict[str, float]:
    """The active version's loss on this run's validation set, when the gate needs it and can have it.

    Not needed when the active version was measured on the same validation set;
    not meaningful for a different base model (another tokenizer counts tokens differently).
    """
    from .training import validation_loss

    active = ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()
    if active is None or metrics.get("eval_loss") is None:
        return {}
    same_set = (active.metrics or {}).get("validation_fingerprint") == metrics.get("validation_fingerprint")
    if same_set or active.base_model != run.base_model:
        return {}
    if not active.merged_path or not Path(active.merged_path).is_dir():
        recorder.note(f"Cannot score {active.label} on this validation set: its merged model is missing")
        return {}
    recorder.note(f"Scoring the active {active.label} on this run's validation set for the promotion gate")
    scored = validation_loss(active.merged_path, dataset.path, config)
    if scored["eval_loss"] is None:
        return {}
    return {str(active.pk): scored["eval_loss"]}


def _model_version_create(*, run: TrainingRun, dataset: DatasetVersion, result, metrics: dict) -> ModelVersion:
    """Record the trained adapter as a candidate version and finish the run, in one transaction."""
    with transaction.atomic():
        _lock("model-versions")
        locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if locked.status != TrainingRun.Status.RUNNING:
            from .training import TrainingCancelled

            raise TrainingCancelled(f"run is {locked.status}")
        number = (ModelVersion.objects.aggregate(top=Max("number"))["top"] or 0) + 1
        target = _model_store() / "versions" / f"v{number}"
        version = ModelVersion.objects.create(
            number=number,
            status=ModelVersion.Status.CANDIDATE,
            training_run=locked,
            dataset_version=dataset,
            base_model=run.base_model,
            adapter_path=str(target / "adapter"),
            merged_path=str(target / "merged") if result.merged_dir else "",
            metrics=metrics,
        )
        gates = model_version_gates_evaluate(version=version)
        locked.status = TrainingRun.Status.SUCCEEDED
        locked.progress = 1.0
        locked.finished_at = timezone.now()
        locked.eval_metrics = {k: v for k, v in metrics.items() if k not in {"loss_history"}}
        state = "passed the gates" if gates["passed"] else gate_failures_text(gates)
        lines = locked.log_tail.splitlines() + [_stamp(f"Saved as {version.label} (candidate); {state}")]
        locked.log_tail = "\n".join(lines[-LOG_TAIL_LINES:])
        locked.save(update_fields=["status", "progress", "finished_at", "eval_metrics", "log_tail"])
        # Last, so a failure above leaves the files where the run's cleanup finds them.
        if target.exists():
            shutil.rmtree(target)  # left over from a version row that no longer exists
        target.mkdir(parents=True)
        Path(result.adapter_dir).replace(target / "adapter")
        if result.merged_dir:
            Path(result.merged_dir).replace(target / "merged")
        for name in ("metrics.json",):
            if (Path(result.output_dir) / name).exists():
                Path(result.output_dir, name).replace(target / name)
        transaction.on_commit(partial(_remove_run_files, result.output_dir))
    return version


# --- promotion gates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


PromotionGate = Callable[[ModelVersion, ModelVersion | None], GateResult]
_PROMOTION_GATES: dict[str, PromotionGate] = {}


def promotion_gate_register(name: str) -> Callable[[PromotionGate], PromotionGate]:
    """Register ``gate(candidate, active) -> GateResult``; every registered gate must pass for auto-promotion."""

    def decorator(gate: PromotionGate) -> PromotionGate:
        _PROMOTION_GATES[name] = gate
        return gate

    return decorator


def promotion_gates() -> dict[str, PromotionGate]:
    return dict(_PROMOTION_GATES)


def model_version_gates_evaluate(
    *, version: ModelVersion, active: ModelVersion | None = None, save: bool = True
) -> dict[str, Any]:
    """Run every gate against the active version (the current one unless given); store the results if ``save``."""
    if active is None:
        active = ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).exclude(pk=version.pk).first()
    results: dict[str, Any] = {}
    for name, gate in _PROMOTION_GATES.items():
        try:
            outcome = gate(version, active)
        except Exception as exc:  # a broken gate must block promotion, not crash it
            log.exception("Promotion gate %s failed to run", name)
            outcome = GateResult(False, f"The gate could not run ({type(exc).__name__}: {exc}).")
        results[name] = asdict(outcome)
    summary = {
        "passed": all(r["passed"] for r in results.values()),
        "compared_with": active.label if active else None,
        "compared_with_id": active.pk if active else None,
        "evaluated_at": timezone.now().isoformat(),
        "gates": results,
    }
    if save:
        version.gate_results = summary
        version.save(update_fields=["gate_results"])
    return summary


def gate_failures_text(gate_results: dict[str, Any]) -> str:
    failed = [f"{name}: {r['detail']}" for name, r in (gate_results.get("gates") or {}).items() if not r["passed"]]
    return "failed gates: " + "; ".join(failed) if failed else "no gate failed"


@promotion_gate_register("validation_loss")
def _gate_validation_loss(candidate: ModelVersion, active: ModelVersion | None) -> GateResult:
    """The candidate's validation loss is no worse than the active version's on the same validation set."""
    loss = (candidate.metrics or {}).get("eval_loss")
    if loss is None:
        return GateResult(False, "The candidate has no validation loss: its dataset has no validation split.")
    if active is None:
        return GateResult(True, "No version is active yet, so there is nothing to be worse than.", {"candidate": loss})
    reference = (candidate.metrics.get("reference_losses") or {}).get(str(active.pk))
    fingerprint = candidate.metrics.get("validation_fingerprint")
    same_set = fingerprint is not None and (active.metrics or {}).get("validation_fingerprint") == fingerprint
    if reference is None and same_set and active.base_model == candidate.base_model:
        reference = (active.metrics or {}).get("eval_loss")
    if reference is None:
        return GateResult(
            False,
            f"{active.label} has not been scored on this candidate's validation set (a different base model, or it "
            "became active after this run), so the losses cannot be compared. Compare the metrics and promote with "
            "a reason, or retrain.",
            {"candidate": loss},
        )
    passed = loss <= reference + 1e-9
    verdict = "no worse than" if passed else "worse than"
    return GateResult(
        passed,
        f"Validation loss {loss:.4f} is {verdict} {active.label}'s {reference:.4f} on the same validation set.",
        {"candidate": loss, "active": reference},
    )


# --- promotion and rollback ----------------------------------------------------------------------


def _require_files(version: ModelVersion) -> None:
    path = version.merged_path or version.adapter_path
    if not path or not Path(path).is_dir():
        raise ApplicationError(
            f"The files of {version.label} are missing ({path or 'no path recorded'}); it cannot serve customers. "
            "Retrain to create a new version.",
            code="version_files_missing",
        )


def _activate(
    version: ModelVersion,
    *,
    previous: ModelVersion | None,
    action: str,
    actor=None,
    automatic: bool = False,
    gates_overridden: bool = False,
    reason: str = "",
    gate_results: dict[str, Any] | None = None,
) -> ModelVersion:
    now = timezone.now()
    actor = actor if getattr(actor, "pk", None) else None
    if previous is not None:
        # Retire first: the one-active constraint is checked row by row.
        previous.status = ModelVersion.Status.RETIRED
        previous.retired_at = now
        previous.save(update_fields=["status", "retired_at"])
        ModelVersionEvent.objects.create(
            version=previous,
            action=ModelVersionEvent.Action.RETIRED,
            actor=actor,
            automatic=automatic,
            reason=f"Replaced by {version.label}",
        )
    version.status = ModelVersion.Status.ACTIVE
    version.promoted_at = now
    version.promoted_by = actor
    version.retired_at = None
    version.save(update_fields=["status", "promoted_at", "promoted_by", "retired_at"])
    ModelVersionEvent.objects.create(
        version=version,
        action=action,
        previous=previous,
        actor=actor,
        automatic=automatic,
        gates_overridden=gates_overridden,
        reason=reason,
        gate_results=gate_results or {},
    )
    transaction.on_commit(partial(model_changed_broadcast, version_id=version.pk, action=action))
    return version


@transaction.atomic
def model_version_promote(
    *, version: ModelVersion, actor=None, reason: str = "", automatic: bool = False
) -> ModelVersion:
    """Make ``version`` the one serving customers.

    The gates run against the version active now. If one fails, an automatic
    promotion is refused; a person may promote anyway by giving a reason, which is
    recorded with their name (``gates_overridden``).
    """
    _lock("model-versions")
    version = ModelVersion.objects.select_for_update().get(pk=version.pk)
    if version.status == ModelVersion.Status.ACTIVE:
        raise ApplicationError(f"{version.label} is already the active version.", code="already_active")
    _require_files(version)
    active = ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).first()
    gates = model_version_gates_evaluate(version=version, active=active)
    overridden = False
    if not gates["passed"]:
        if automatic:
            raise ApplicationError(
                f"{version.label} was not promoted automatically: {gate_failures_text(gates)}", code="gates_failed"
            )
        if not reason.strip():
            raise ApplicationError(
                f"{version.label} {gate_failures_text(gates)}. To promote it anyway, give a reason: it is recorded "
                "with your name.",
                code="gates_failed",
                extra={"gates": gates},
            )
        overridden = True
    return _activate(
        version,
        previous=active,
        action=ModelVersionEvent.Action.PROMOTED,
        actor=actor,
        automatic=automatic,
        gates_overridden=overridden,
        reason=reason.strip(),
        gate_results=gates,
    )


@transaction.atomic
def model_version_rollback(*, actor=None, to_version: ModelVersion | None = None, reason: str = "") -> ModelVersion:
    """Restore an earlier version: by default the one that was active before the current one.

    Any version that has served before can be restored; the gates do not apply,
    since it was already vetted when it first went live.
    """
    _lock("model-versions")
    active = ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).first()
    if to_version is None:
        if active is None:
            raise ApplicationError("No version is active, so there is nothing to roll back from.", code="no_active")
        last = (
            active.events.filter(
                action__in=[ModelVersionEvent.Action.PROMOTED, ModelVersionEvent.Action.ROLLED_BACK],
                previous__isnull=False,
            )
            .select_related("previous")
            .order_by("-created_at", "-id")
            .first()
        )
        target = last.previous if last is not None else None
        if target is None:
            target = (
                ModelVersion.objects.filter(status=ModelVersion.Status.RETIRED, promoted_at__isnull=False)
                .order_by("-retired_at", "-number")
                .first()
            )
        if target is None:
            raise ApplicationError(
                f"{active.label} is the first version that served; there is no earlier one to roll back to.",
                code="no_previous",
            )
    else:
        target = to_version
    target = ModelVersion.objects.select_for_update().get(pk=target.pk)
    if target.status == ModelVersion.Status.ACTIVE:
        raise ApplicationError(f"{target.label} is already the active version.", code="already_active")
    if target.promoted_at is None:
        raise ApplicationError(
            f"{target.label} has never served customers, so it cannot be rolled back to; promote it instead "
            "(the gates apply).",
            code="never_active",
        )
    _require_files(target)
    return _activate(
        target,
        previous=active,
        action=ModelVersionEvent.Action.ROLLED_BACK,
        actor=actor,
        reason=reason.strip() or (f"Rolled back from {active.label}" if active else "Restored"),
    )


def model_changed_broadcast(*, version_id: int, action: str) -> None:
    """Tell running chat servers that the active version changed (they reload it).

    Runs after commit. Delivery is best-effort (channel layers drop messages); the
    database stays the source of truth, so a server that missed it can still read
    the active version there.
    """
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    version = ModelVersion.objects.filter(pk=version_id).first()
    layer = get_channel_layer()
    if version is None or layer is None:
        return
    message = {
        "type": MODEL_CHANGED_EVENT,
        "action": action,
        "version_id": version.pk,
        "label": version.label,
        "status": version.status,
        "base_model": version.base_model,
        "merged_path": version.merged_path,
        "adapter_path": version.adapter_path,
    }
    try:
        async_to_sync(layer.group_send)(MODEL_EVENTS_GROUP, message)
    except Exception:  # the promotion has committed; a lost notice must not turn it into an error
        log.exception("Could not tell chat servers that %s is now %s", version.label, version.status)
