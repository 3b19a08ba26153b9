"""Build a redacted fine-tuning dataset from the imported tickets and agent feedback.

    python manage.py build_dataset
    python manage.py build_dataset --out var/datasets/june --since 2024-06-01 --val-fraction 0.1 --seed 7
    python manage.py build_dataset --base-model /path/to/model --max-examples 5000 --max-length 384

Writes a datasets.DatasetDict (train, validation) with card.json and README.md and
records it as a DatasetVersion (listed in the admin). Format: docs/dataset-format.md.
"""

from __future__ import annotations

from datetime import datetime

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from tqdm import tqdm

from finetune import selectors
from finetune.management.errors import command_error
from finetune.services.datasets import DEFAULT_MAX_LENGTH, dataset_version_build
from supportbot.errors import ApplicationError

# Options whose name is not the service's setting name (see ``command_error``).
OPTIONS = {"out_dir": "--out"}


def _since(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--since {value!r} is not a date; write e.g. 2024-06-01 or 2024-06-01T12:00") from None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, timezone.get_current_timezone())


class Command(BaseCommand):
    help = "Build a fine-tuning dataset (train/validation, redacted) from tickets and agent feedback."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--out",
            help="Output folder (must not exist or be empty). Default: a new folder under SUPPORTBOT_DATASET_DIR.",
        )
        parser.add_argument("--since", help="Only tickets opened (and reviews written) on or after this date.")
        parser.add_argument(
            "--source",
            action="append",
            dest="sources",
            metavar="NAME",
            help="Only tickets imported with this --source (repeatable). Default: all tickets.",
        )
        parser.add_argument("--val-fraction", type=float, default=0.1, help="Share of each intent held out (0.1).")
        parser.add_argument("--seed", type=int, default=0, help="Seed of the validation split (0).")
        parser.add_argument("--max-examples", type=int, help="Stop after this many examples (oldest tickets first).")
        parser.add_argument(
            "--max-length",
            type=int,
            default=DEFAULT_MAX_LENGTH,
            help=f"Tokens per example ({DEFAULT_MAX_LENGTH}); longer ones lose old context, never the reply.",
        )
        parser.add_argument(
            "--base-model", help="Base model whose tokenizer renders the examples. Default: SUPPORTBOT_BASE_MODEL."
        )
        parser.add_argument("--no-feedback", action="store_true", help="Leave out agents' approvals and corrections.")
        parser.add_argument(
            "--no-system-prompt", action="store_true", help="Do not start examples with the bot's system prompt."
        )
        parser.add_argument(
            "--workers",
            type=int,
            help="Processes preparing examples. Default: 1 below 10,000 tickets, else one per core (at most 2).",
        )
        parser.add_argument("--user", help="Username recorded as the builder of this dataset.")
        parser.add_argument("--no-progress", action="store_true", help="Do not draw a progress bar.")

    def handle(self, *args, **options):
        since = _since(options["since"]) if options["since"] else None
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"No user named {options['user']!r}.")
        bar = tqdm(
            total=selectors.ticket_count(since=since, sources=options["sources"]),
            unit=" tickets",
            desc="Building dataset",
            disable=options["no_progress"] or options["verbosity"] == 0,
            file=self.stderr._out,  # the raw stream: OutputWrapper would end each redraw with a newline
        )
        started = timezone.now()
        try:
            version = dataset_version_build(
                out_dir=options["out"],
                since=since,
                sources=options["sources"],
                val_fraction=options["val_fraction"],
                seed=options["seed"],
                max_examples=options["max_examples"],
                max_length=options["max_length"],
                base_model=options["base_model"],
                include_feedback=not options["no_feedback"],
                system_prompt=not options["no_system_prompt"],
                workers=options["workers"],
                created_by=user,
                progress=bar.update,
            )
        except ApplicationError as exc:
            raise command_error(exc, options=OPTIONS) from exc
        finally:
            bar.close()
        if version.created_at < started:
            self.stdout.write(
                self.style.SUCCESS(
                    f"No change: the tickets give exactly dataset {version.name} (content hash "
                    f"{version.content_hash[:16]}…), built {version.created_at:%Y-%m-%d %H:%M}; reusing it."
                )
            )
            return
        card = version.card
        dropped = ", ".join(f"{k}: {v}" for k, v in card.get("dropped", {}).items()) or "none"
        redacted = ", ".join(f"{k}: {v}" for k, v in card.get("redactions", {}).items()) or "none"
        self.stdout.write(
            self.style.SUCCESS(
                f"Dataset {version.name}: {version.num_train} train, {version.num_validation} validation "
                f"examples at {version.path}"
            )
        )
        self.stdout.write(f"  tokenizer: {version.tokenizer}; content hash {version.content_hash[:16]}…")
        self.stdout.write(f"  redacted: {redacted}")
        self.stdout.write(f"  dropped: {dropped}")
