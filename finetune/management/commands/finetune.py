"""Fine-tune from the shell with a progress bar, through the same services as the admin's "Retrain now".

    python manage.py finetune                                  # newest dataset; promote if the gates pass
    python manage.py finetune --dataset tickets-2024 --epochs 1 --max-examples 500 --no-promote
    python manage.py finetune --build-fresh-if-missing --skip-if-active --max-length 128   # make demo
    python manage.py finetune --reap                           # fail runs whose worker died

The run is recorded like any other (one live run at a time, same gates, same
model store); it trains in this process instead of a Celery worker. Exit status 3
means there is no dataset to train on.
"""

from __future__ import annotations

import argparse
import logging
import sys

from django.core.management.base import BaseCommand, CommandError

from finetune.management.errors import command_error
from finetune.models import DatasetVersion, TrainingRun
from finetune.selectors import (
    dataset_version_find,
    dataset_version_latest,
    model_version_active,
    model_version_of_run,
    training_run_outcome_lines,
)
from finetune.services.model_versions import model_version_promote_first
from finetune.services.training_runs import (
    training_run_execute,
    training_run_request,
    training_runs_reap_stale,
    training_settings_requestable,
)
from supportbot.errors import ApplicationError

NO_DATASET_EXIT = 3
# This command's older names for two settings, still accepted beside the generated ones.
SETTING_ALIASES = {"lora_r": ["--rank"], "eval_generate_samples": ["--eval-samples"]}


class Command(BaseCommand):
    help = "Fine-tune the base model with LoRA on a dataset version, here and now, with a progress bar."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", help="Dataset version name or id (default: the newest).")
        parser.add_argument("--build-fresh", action="store_true", help="Build a new dataset from the tickets first.")
        parser.add_argument(
            "--build-fresh-if-missing", action="store_true", help="Build a dataset only when there is none yet."
        )
        # One option per setting the service lets a person choose (--learning-rate, --lora-r, …).
        for setting in training_settings_requestable():
            parser.add_argument(
                f"--{setting.name.replace('_', '-')}",
                *SETTING_ALIASES.get(setting.name, []),
                dest=setting.name,
                type=setting.type,
                help=setting.help if setting.default is None else f"{setting.help} Default: {setting.default}.",
            )
        parser.add_argument(
            "--promote",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="Promote the new version if it passes the gates (default: yes).",
        )
        parser.add_argument(
            "--first-version-reason",
            metavar="REASON",
            default="",
            help=(
                "When no version is active and the new one fails a gate, promote it anyway with this reason "
                "(recorded on the version, as a person's promote-anyway is): a first version to try, as make demo does."
            ),
        )
        parser.add_argument("--skip-if-active", action="store_true", help="Do nothing if a version is active.")
        parser.add_argument("--reap", action="store_true", help="Only fail runs whose worker stopped responding.")

    def handle(self, *args, **options):
        if options["reap"]:
            reaped = training_runs_reap_stale()
            for run in reaped:
                self.stdout.write(f"Run #{run.pk}: {run.error}")
            self.stdout.write(f"{len(reaped)} run(s) marked failed.")
            return
        active = model_version_active()
        if options["skip_if_active"] and active is not None:
            self.stdout.write(f"{active.label} is already active ({active.base_model}); nothing to do.")
            return

        hyperparameters = {
            setting.name: options[setting.name]
            for setting in training_settings_requestable()
            if options.get(setting.name) is not None
        }
        dataset = self._dataset(options["dataset"])
        have_dataset = dataset is not None or dataset_version_latest() is not None
        build_fresh = options["build_fresh"] or (options["build_fresh_if_missing"] and not have_dataset)
        if not have_dataset and not build_fresh:
            raise CommandError(
                "There is no dataset yet. Build one with `python manage.py build_dataset`, or pass "
                "--build-fresh-if-missing.",
                returncode=NO_DATASET_EXIT,
            )
        try:
            run = training_run_request(
                dataset_version=dataset,
                build_fresh=build_fresh,
                hyperparameters=hyperparameters,
                auto_promote=options["promote"],
                enqueue=False,
            )
        except ApplicationError as exc:
            code = NO_DATASET_EXIT if exc.code in {"no_dataset", "no_dataset_builder", "dataset_missing"} else 1
            raise command_error(exc, returncode=code) from exc
        self.stdout.write(f"Run #{run.pk}: training (Ctrl-C stops it; the run is then marked failed by --reap)")
        # The progress bar prints the trainer's messages; its logger would print them a second time.
        trainer_log = logging.getLogger("finetune.ml.training")
        level = trainer_log.level
        trainer_log.setLevel(logging.WARNING)
        try:
            run = training_run_execute(run_id=run.pk, on_progress=_ProgressBar(self.stderr))
        finally:
            trainer_log.setLevel(level)
        self._report(run, first_version_reason=options["first_version_reason"].strip())

    def _dataset(self, value: str | None) -> DatasetVersion | None:
        if not value:
            return None
        dataset = dataset_version_find(value)
        if dataset is None:
            raise CommandError(f"No dataset version named or numbered {value!r}.", returncode=NO_DATASET_EXIT)
        return dataset

    def _report(self, run: TrainingRun, *, first_version_reason: str = "") -> None:
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise CommandError(f"Run #{run.pk} {run.get_status_display().lower()}: {run.error or 'cancelled'}")
        version = model_version_of_run(run)
        for line in training_run_outcome_lines(run):
            self.stdout.write(line)
        gates = "passed the gates" if version.gate_results.get("passed") else "did not pass the gates"
        self.stdout.write(
            self.style.SUCCESS(
                f"Run #{run.pk} succeeded: {version.label} ({version.get_status_display().lower()}, {gates}), "
                f"base {version.base_model}, in {version.merged_path or version.adapter_path}"
            )
        )
        if first_version_reason and not version.gate_results.get("passed"):
            try:
                promoted = model_version_promote_first(version=version, reason=first_version_reason)
            except ApplicationError as exc:
                raise command_error(exc) from exc
            if promoted is None:
                return
            version = promoted
            self.stdout.write(
                self.style.WARNING(
                    f"{version.label} failed a gate but no version was active, so it was promoted anyway: "
                    f"{first_version_reason!r} (recorded on its version page, which shows why each gate failed)."
                )
            )


class _ProgressBar:
    """Shows the trainer's progress events as a tqdm bar over the optimizer steps."""

    def __init__(self, stream):
        self.stream = stream
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.message:
            if self.bar is not None:
                self.bar.write(event.message, file=sys.stderr)
            else:
                self.stream.write(event.message)
        if event.phase == "training" and event.total_steps:
            if self.bar is None:
                self.bar = tqdm(total=event.total_steps, desc="training", unit="step", file=sys.stderr)
            self.bar.update(event.step - self.bar.n)
            if event.loss is not None:
                self.bar.set_postfix(loss=f"{event.loss:.4f}")
        elif self.bar is not None and event.phase != "training":
            self.bar.close()
            self.bar = None
