"""Export agents' reviews: ratings, reasons, notes and corrections.

    python manage.py export_feedback --format csv > feedback.csv
    python manage.py export_feedback --format jsonl --out feedback.jsonl --since 2025-01-01
    python manage.py export_feedback --format hf --out var/feedback-ds --latest-only

Every submission is a row (reviews are append-only); ``latest`` marks each reply's
latest review, and ``--latest-only`` keeps only those. ``hf`` writes a Hugging Face
``datasets`` dataset with ``save_to_disk`` (load it with ``datasets.load_from_disk``).
Columns: conversations.review.selectors.EXPORT_COLUMNS.
"""

from __future__ import annotations

from datetime import date, datetime, time

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from conversations.review.export import FORMATS, csv_chunks, jsonl_chunks, write_hf
from conversations.review.selectors import EXPORT_COLUMNS, feedback_export_rows


class Command(BaseCommand):
    help = "Export agents' reviews (ratings, reasons, notes, corrections) as CSV, JSON Lines or a datasets dataset."

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--out", help="File (csv, jsonl; default: standard output) or empty folder (hf).")
        parser.add_argument("--since", help="Only reviews submitted on or after this date (YYYY-MM-DD).")
        parser.add_argument("--latest-only", action="store_true", help="Only each reply's latest review.")

    def handle(self, *args, **options):
        since = None
        if options["since"]:
            try:
                day = date.fromisoformat(options["since"])
            except ValueError as exc:
                raise CommandError(f"--since must be a date like 2025-01-31, not {options['since']!r}.") from exc
            since = timezone.make_aware(datetime.combine(day, time.min), timezone.get_current_timezone())
        rows = feedback_export_rows(since=since, latest_only=options["latest_only"])
        fmt, out = options["format"], options["out"]
        if fmt == "hf":
            if not out:
                raise CommandError("--format hf needs --out: an empty folder to save the dataset in.")
            try:
                count = write_hf(rows, EXPORT_COLUMNS, out)
            except FileExistsError as exc:
                raise CommandError(str(exc)) from exc
            self.stderr.write(f"Saved {count} reviews as a datasets dataset in {out} (datasets.load_from_disk).")
            return
        chunks = (csv_chunks if fmt == "csv" else jsonl_chunks)(rows, EXPORT_COLUMNS)
        count = -1 if fmt == "csv" else 0  # the CSV header is a chunk too
        if out:
            with open(out, "w", encoding="utf-8", newline="") as stream:
                for chunk in chunks:
                    stream.write(chunk)
                    count += 1
        else:
            for chunk in chunks:
                self.stdout.write(chunk, ending="")
                count += 1
        self.stderr.write(f"Exported {count} reviews{f' to {out}' if out else ''}.")
