"""Building fine-tuning datasets: ``dataset_version_build`` records a build as a ``DatasetVersion``.

The input is every ticket (``finetune.selectors.ticket_conversations``) and, unless
left out, the replies agents approved or corrected in the chat (which the chat app
provides, see ``finetune.providers``). Redacting, rendering, deduplicating and
splitting are plain Python (``finetune.ml.dataset_builder``); this module picks the
folder, the tokenizer and the worker count, and records the result. A build whose
content equals a recorded version's reuses that version.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from itertools import chain
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from finetune import selectors
from finetune.ml.base_model import BaseModelNotFound, resolve_base_model
from finetune.ml.dataset_builder import BuildOptions, build_dataset
from finetune.models import DatasetVersion
from supportbot.errors import ApplicationError

log = logging.getLogger(__name__)

PARALLEL_BUILD_MIN_TICKETS = 10_000
MAX_BUILD_WORKERS = 2  # measured on two cores; the main process (reads, dedup, Arrow writes) limits beyond
DEFAULT_MAX_LENGTH = 512  # tokens per example; ticket threads rarely exceed it (see the card's percentiles)


def _invalid(field: str, message: str) -> ApplicationError:
    """A refused build setting; ``extra["field"]`` names it, so each interface can point at its own input."""
    return ApplicationError(message, code="invalid", extra={"field": field})


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
        raise _invalid("val_fraction", f"The validation fraction must be at least 0 and below 1, not {val_fraction}.")
    if max_examples is not None and max_examples < 1:
        raise _invalid("max_examples", f"The number of examples must be at least 1, not {max_examples}.")
    if max_length < 32:
        raise _invalid("max_length", f"The example length must be at least 32 tokens, not {max_length}.")
    if seed < 0:
        raise _invalid("seed", f"The seed must be zero or positive, not {seed}.")
    if since is not None and timezone.is_naive(since):
        since = timezone.make_aware(since, timezone.get_current_timezone())

    explicit_out = out_dir is not None
    if explicit_out:
        out = Path(out_dir).expanduser().resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ApplicationError(
                f"{out} already exists and is not empty; choose another folder.",
                code="exists",
                extra={"field": "out_dir"},
            )
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
        raise _invalid("workers", f"The number of worker processes must be at least 1, not {workers}.")

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
