"""Import historical tickets from a file: Bitext CSV, any CSV with a field map, or JSONL.

    python manage.py import_tickets ../shared/data/bitext/customer_support_tickets.csv --format bitext
    python manage.py import_tickets export.csv --format csv \
        --map external_id=id,customer_message=question,agent_reply=answer,intent=topic
    python manage.py import_tickets finetune/fixtures/sample_tickets.jsonl --format jsonl --source sample

Importing the same file again changes nothing (upsert on source + external id).
Broken rows are skipped and listed with their line numbers; the rest imports.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from finetune.management.errors import command_error
from finetune.ml.importers import CSV_FIELDS, FORMATS, RowError, parse_field_map
from finetune.services.tickets import IMPORT_BATCH_SIZE, ticket_import
from supportbot.errors import ApplicationError


class Command(BaseCommand):
    help = "Import historical support tickets from a Bitext CSV, a mapped CSV or a JSONL file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="The file to import.")
        parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="The file's format.")
        parser.add_argument(
            "--source",
            help="Name of this ticket source; (source, external id) identifies a ticket. "
            "Default: 'bitext' for --format bitext, else the file name without extension.",
        )
        parser.add_argument(
            "--map",
            action="append",
            metavar="FIELD=COLUMN[,FIELD=COLUMN…]",
            help=f"For --format csv: which column holds each field. Fields: {', '.join(CSV_FIELDS)}. "
            "customer_message and agent_reply are required.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=IMPORT_BATCH_SIZE,
            help=f"Tickets per transaction (default {IMPORT_BATCH_SIZE}).",
        )
        parser.add_argument("--no-progress", action="store_true", help="Do not draw a progress bar.")

    def handle(self, *args, path: Path, fmt: str, source, map, batch_size: int, no_progress: bool, **options):  # noqa: A002
        try:
            field_map = parse_field_map(map)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        size = path.stat().st_size if path.is_file() else 0
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"Importing {path.name}",
            disable=no_progress or options.get("verbosity", 1) == 0,
            file=self.stderr._out,  # the raw stream: OutputWrapper would end each redraw with a newline
        )

        def report(problem: RowError) -> None:
            bar.write(f"  skipped {problem}", file=self.stderr._out)

        try:
            summary = ticket_import(
                path=path,
                fmt=fmt,
                source=source,
                field_map=field_map,
                batch_size=batch_size,
                on_progress=bar.update,
                on_problem=report,
            )
        except ApplicationError as exc:
            raise command_error(exc) from exc
        finally:
            bar.close()
        for warning in summary.warnings:
            self.stderr.write(f"  warning: {warning}")
        if summary.repeated_ids > len(summary.warnings):
            self.stderr.write(
                f"  … {summary.repeated_ids} rows in all repeated an earlier row's external id "
                f"(the first {len(summary.warnings)} are listed)."
            )
        reasons = ", ".join(f"{code}: {count}" for code, count in sorted(summary.skipped_by_reason.items()))
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {path.name} as source {summary.source!r}: {summary.created} created, "
                f"{summary.updated} updated, {summary.unchanged} unchanged, {summary.skipped} skipped"
                + (f" ({reasons})" if reasons else "")
                + "."
            )
        )
