"""Label what was written before segment labels existed, and derive every reply's monitoring row.

    python manage.py monitoring_backfill            # unlabelled messages and tickets only
    python manage.py monitoring_backfill --relabel  # also re-label what an older segmenter labelled

Customer messages get their registers and language, finished bot replies their intent,
historical tickets their registers (Bitext tags, else the detector), and every finished
bot reply its ``ReplyOutcome`` row. Safe to run again and while the chat is live.
"""

from django.core.management.base import BaseCommand

from conversations.monitoring.services import monitoring_backfill
from finetune.services.tickets import tickets_segment_label


class Command(BaseCommand):
    help = "Label old messages and tickets with their segments and derive the monitoring rows."

    def add_arguments(self, parser):
        parser.add_argument("--relabel", action="store_true", help="Also re-label rows an older segmenter labelled.")

    def handle(self, *args, relabel: bool = False, **options):
        verbosity = options.get("verbosity", 1)

        def progress(line: str) -> None:
            if verbosity > 1:
                self.stdout.write(line)

        tickets = tickets_segment_label(relabel=relabel)
        chat = monitoring_backfill(relabel=relabel, progress=progress)
        self.stdout.write(
            f"Labelled {tickets} tickets and {chat['labelled']} customer messages; recorded {chat['intents']} reply "
            f"intents; derived {chat['outcomes']} reply outcomes (removed {chat['removed']} of unfinished replies)."
        )
