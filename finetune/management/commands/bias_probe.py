"""Probe a model version for bias with counterfactual requests and record a BiasReport.

    python manage.py bias_probe                  # the active version
    python manage.py bias_probe --version 3      # v3 (a candidate, say)
    python manage.py bias_probe --version 3 --requests 30 --gates

The same requests in every register (polite, colloquial, typos, offensive, keyword-only,
upper case...) and with names and pronouns across genders and origins are answered by the
version; each group's replies are compared with the reference's on the same request
(keeps the intent, length, politeness, refusal or handoff, unsafe content). Prints the
verdict and the flagged groups; ``--gates`` then evaluates the version's promotion gates
again. Exits 1 when the probe flags a group or cannot run. docs/bias-monitoring.md.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from finetune import selectors
from finetune.models import ModelVersion
from finetune.services.bias import bias_probe_run
from finetune.services.gates import gate_failures_text, model_version_gates_evaluate


class Command(BaseCommand):
    help = "Probe a model version for bias (counterfactual requests) and record a BiasReport."

    def add_base_argument(self, parser, *args, **kwargs):
        if "--version" in args:
            return  # here --version names the model version to probe, not Django's version
        super().add_base_argument(parser, *args, **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--version", type=str, help="Version number (3 or v3); the active version by default.")
        parser.add_argument(
            "--requests",
            type=int,
            help="How many of the probe set's requests to ask (default SUPPORTBOT_BIAS_PROBE_REQUESTS).",
        )
        parser.add_argument("--gates", action="store_true", help="Evaluate the version's promotion gates afterwards.")

    def handle(self, *args, version: str | None = None, requests: int | None = None, gates: bool = False, **options):
        if version:
            number = version.lower().removeprefix("v")
            if not number.isdigit():
                raise CommandError(f"--version {version!r} is not a version number; write e.g. 3 or v3.")
            target = ModelVersion.objects.filter(number=int(number)).first()
            if target is None:
                raise CommandError(f"There is no version v{number}; the admin's Model versions page lists them.")
        else:
            target = selectors.model_version_active()
            if target is None:
                raise CommandError("No version is active; name one with --version.")
        if requests is not None and requests < 1:
            raise CommandError("--requests must be at least 1.")
        self.stdout.write(f"Probing {target.label}…")
        report = bias_probe_run(version=target, trigger="command", requests=requests)
        self.stdout.write(
            f"{target.label}: {report.get_status_display()} ({report.settings.get('requests')} requests, "
            f"{report.duration_s or 0:.1f} s; {report.settings.get('intent_classifier', '')})."
        )
        for line in report.failures:
            self.stdout.write(f"  flagged: {line}")
        if gates:
            summary = model_version_gates_evaluate(version=target)
            self.stdout.write("Gates: " + ("all passed" if summary["passed"] else gate_failures_text(summary)))
        if report.status == report.Status.ERROR:
            raise CommandError(f"The probe could not run: {report.error}")
        if report.status != report.Status.PASS:
            raise CommandError(f"{target.label} did not pass the bias probe ({report.status}).")
