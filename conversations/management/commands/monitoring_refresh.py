"""Compute the bias-monitoring dashboard's figures now and keep them in the cache.

    python manage.py monitoring_refresh               # the default window (SUPPORTBOT_MONITORING_DAYS)
    python manage.py monitoring_refresh --days all

With a shared cache (REDIS_URL) every server then shows them at once. The Celery workers
already recompute the default window every SUPPORTBOT_MONITORING_REFRESH_S
(conversations/monitoring/refresh.py); this command is for another window, or now.
"""

from django.core.management.base import BaseCommand, CommandError

from conversations.monitoring.selectors import MonitoringFilters, monitoring_report


class Command(BaseCommand):
    help = "Compute the monitoring dashboard's figures and keep them in the cache."

    def add_arguments(self, parser):
        parser.add_argument("--days", default="", help="Window in days, or 'all' (default: the dashboard's).")

    def handle(self, *args, days: str = "", **options):
        if days and days != "all" and not days.isdigit():
            raise CommandError(f"--days {days!r}: write a number of days or 'all'.")
        filters = MonitoringFilters.from_query({"days": days})
        report = monitoring_report(filters, refresh=True)
        self.stdout.write(
            f"{report['rows']} replies, {len(report['tests'])} tests, {len(report['alerts'])} alerts; "
            f"computed at {report['computed_at']}."
        )
