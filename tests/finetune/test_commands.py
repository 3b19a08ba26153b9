"""The management commands (import_tickets, build_dataset, finetune): options, output, errors."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from datasets import load_from_disk
from django.core.management import CommandError, call_command
from django.utils import timezone

from finetune.models import DatasetVersion, ModelVersion, Ticket, TrainingRun
from tests.factories import TrainingRunFactory
from tests.finetune.fixtures import dataset_version_create, version_with_files, write_broken_csv

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_import_tickets_reports_a_summary_and_is_idempotent(bitext_csv):
    out, _ = run("import_tickets", str(bitext_csv), "--format", "bitext", "--no-progress")
    assert "as source 'bitext': 3651 created, 0 updated, 0 unchanged, 0 skipped." in out
    out, _ = run("import_tickets", str(bitext_csv), "--format", "bitext", "--no-progress")
    assert "0 created, 0 updated, 3651 unchanged, 0 skipped." in out
    assert Ticket.objects.count() == 3651


def test_import_tickets_lists_skipped_rows_with_line_numbers(tmp_path):
    path = write_broken_csv(tmp_path / "export.csv")
    out, err = run(
        "import_tickets",
        str(path),
        "--format",
        "csv",
        "--map",
        "external_id=id,customer_message=question,agent_reply=answer",
        "--map",
        "intent=topic,tags=register,customer_email=email,created_at=opened",
    )
    assert "3 created, 0 updated, 0 unchanged, 5 skipped" in out
    assert "bad_encoding: 1" in out
    assert "skipped line 5: missing reply (column 'answer' is empty)" in err
    assert "skipped line 6: not valid UTF-8" in err
    assert "skipped line 9: field 'created_at' is not an ISO 8601 date" in err
    assert "Importing export.csv" in err  # the progress bar


def test_import_tickets_refuses_a_file_of_another_format(bitext_csv, tmp_path):
    with pytest.raises(CommandError, match="not a JSONL file.*Nothing was imported"):
        run("import_tickets", str(bitext_csv), "--format", "jsonl")
    with pytest.raises(CommandError, match="unknown field 'question'"):
        run("import_tickets", str(bitext_csv), "--format", "csv", "--map", "question=instruction")
    with pytest.raises(CommandError, match="does not exist"):
        run("import_tickets", str(tmp_path / "missing.jsonl"), "--format", "jsonl")
    assert Ticket.objects.count() == 0


def test_build_dataset_writes_and_records_a_dataset(dataset_settings, sample_tickets, tmp_path):
    run("import_tickets", str(sample_tickets), "--format", "jsonl", "--source", "sample", "--no-progress")
    out_dir = tmp_path / "june"
    out, err = run(
        "build_dataset", "--out", str(out_dir), "--since", "2024-03-01", "--val-fraction", "0.2", "--seed", "4"
    )
    version = DatasetVersion.objects.get()
    assert f"Dataset june: {version.num_train} train, {version.num_validation} validation" in out
    assert "redacted: " in out
    assert "EMAIL: " in out
    assert "dropped: " in out
    assert "Building dataset" in err  # the progress bar
    assert version.params["since"].startswith("2024-03-01T00:00:00")
    assert version.params["val_fraction"] == 0.2
    assert load_from_disk(str(out_dir))["validation"].num_rows == version.num_validation
    assert Path(version.path) == out_dir.resolve()


def test_build_dataset_reuses_identical_content(dataset_settings, sample_tickets):
    run("import_tickets", str(sample_tickets), "--format", "jsonl", "--source", "sample", "--no-progress")
    run("build_dataset", "--max-examples", "30", "--no-progress")
    out, _ = run("build_dataset", "--max-examples", "30", "--no-progress")
    assert "No change: the tickets give exactly dataset" in out
    assert DatasetVersion.objects.count() == 1


def test_build_dataset_errors(dataset_settings):
    with pytest.raises(CommandError, match="import tickets first"):
        run("build_dataset", "--no-progress")
    with pytest.raises(CommandError, match="is not a date"):
        run("build_dataset", "--since", "last week")
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        run("build_dataset", "--user", "nobody")


def test_build_dataset_names_the_option_behind_a_refused_setting(dataset_settings, tmp_path):
    with pytest.raises(CommandError, match=r"^--val-fraction: The validation fraction must be .* not 1\.5"):
        run("build_dataset", "--val-fraction", "1.5", "--no-progress")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("")
    with pytest.raises(CommandError, match=r"^--out: .*taken already exists and is not empty"):
        run("build_dataset", "--out", str(taken), "--no-progress")
    assert not DatasetVersion.objects.exists()


# --- finetune -----------------------------------------------------------------------------------


def test_finetune_offers_every_setting_a_run_may_choose():
    from finetune.management.commands.finetune import Command
    from finetune.services.training_runs import REQUESTABLE_SETTINGS

    parser = Command().create_parser("manage.py", "finetune")
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name in REQUESTABLE_SETTINGS} <= flags
    parsed = parser.parse_args(["--rank", "4", "--lora-alpha", "8", "--eval-samples", "2", "--learning-rate", "1e-3"])
    assert (parsed.lora_r, parsed.lora_alpha, parsed.eval_generate_samples) == (4, 8, 2)
    assert parsed.learning_rate == pytest.approx(1e-3)
    assert parsed.epochs is None  # unset: the service's default applies


def test_finetune_without_a_dataset_says_what_to_do(model_store):
    with pytest.raises(CommandError, match="no dataset yet.*build_dataset") as failure:
        call_command("finetune")
    assert failure.value.returncode == 3
    # Building one needs tickets: the run fails and says so.
    with pytest.raises(CommandError, match="import_tickets") as failure:
        call_command("finetune", "--build-fresh-if-missing")
    assert TrainingRun.objects.get().status == TrainingRun.Status.FAILED


def test_finetune_trains_and_promotes_with_a_progress_bar(
    transactional_db, model_store, dataset_dir, settings, quality_gate_advisory
):
    settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = 0.2
    dataset = dataset_version_create(dataset_dir, name="june")
    out, err = StringIO(), StringIO()
    call_command(
        "finetune", "--dataset", "june", "--epochs", "2", "--learning-rate", "0.01", "--max-length", "64",
        "--eval-samples", "2", "--eval-max-new-tokens", "8", stdout=out, stderr=err,
    )  # fmt: skip
    run = TrainingRun.objects.get()
    version = ModelVersion.objects.get()
    assert run.status == TrainingRun.Status.SUCCEEDED
    assert run.dataset_version == dataset
    assert version.status == ModelVersion.Status.ACTIVE
    assert f"Run #{run.pk} succeeded: v1 (active, passed the gates)" in out.getvalue()
    assert "validation loss:" in out.getvalue()
    # The replies customers would get, beside the retrieval baseline (the quality gate's rows).
    assert "candidate            ROUGE-L" in out.getvalue()
    assert "retrieval            ROUGE-L" in out.getvalue()
    assert "training:" in err.getvalue()  # tqdm's bar
    # What the numbers mean, and why the version was promoted, in words.
    report = out.getvalue()
    assert "ROUGE-L: " in report
    assert "word overlap between the model's replies and the agents' real replies" in report
    assert "reusing the reply of the most similar training ticket" in report
    assert "Promotion gates (no version was active to compare with):" in report
    assert "validation_loss: passed. No version is active yet" in report
    assert "v1 is now active: it passed every gate and automatic promotion was on." in report

    out = StringIO()
    call_command("finetune", "--skip-if-active", stdout=out)
    assert "v1 is already active" in out.getvalue()
    assert TrainingRun.objects.count() == 1

    # Not promoted: the report says why, and what the gates said against v1.
    out = StringIO()
    call_command(
        "finetune", "--dataset", "june", "--epochs", "1", "--learning-rate", "0.01", "--max-length", "64",
        "--eval-samples", "2", "--eval-max-new-tokens", "8", "--no-promote", stdout=out, stderr=StringIO(),
    )  # fmt: skip
    report = out.getvalue()
    assert "Promotion gates (compared with the active v1):" in report
    assert "v2 stays a candidate: automatic promotion was off (--no-promote)" in report
    assert ModelVersion.objects.get(status=ModelVersion.Status.ACTIVE) == version


def test_finetune_reports_a_failed_run_as_an_error(transactional_db, model_store, dataset_dir, settings, tmp_path):
    settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = 0.2
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    dataset_version_create(dataset_dir)
    for arrow in dataset_dir.glob("train/*.arrow"):
        arrow.write_bytes(b"junk")
    with pytest.raises(CommandError, match="failed: The dataset at .* cannot be read"):
        call_command("finetune", "--epochs", "1")
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE


def test_finetune_reap_fails_runs_whose_worker_died(model_store):
    dead = TrainingRunFactory(status=TrainingRun.Status.RUNNING, heartbeat_at=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("finetune", "--reap", stdout=out)
    dead.refresh_from_db()
    assert dead.status == TrainingRun.Status.FAILED
    assert "1 run(s) marked failed" in out.getvalue()


def test_a_first_version_that_fails_a_gate_is_promoted_only_with_the_reason_given(
    transactional_db, model_store, dataset_dir, settings, quality_gate_advisory, monkeypatch
):
    """make demo's --first-version-reason: with nothing active, a candidate that failed a gate is promoted
    anyway, the reason recorded as a person's would be; with a version active it stays a candidate."""
    from finetune.services import gates

    monkeypatch.setitem(gates._PROMOTION_GATES, "never", lambda candidate, active: gates.GateResult(False, "No."))
    dataset_version_create(dataset_dir, name="june")
    args = ["finetune", "--dataset", "june", "--epochs", "1", "--max-length", "64", "--eval-samples", "2"]
    reason = "make demo: a first version to try"
    out = StringIO()
    call_command(*args, "--first-version-reason", reason, stdout=out)
    first = ModelVersion.objects.get()
    assert first.status == ModelVersion.Status.ACTIVE
    event = first.events.get(action="promoted")
    assert (event.gates_overridden, event.reason, event.automatic) == (True, reason, False)
    assert "failed a gate but no version was active, so it was promoted anyway" in out.getvalue()

    out = StringIO()
    call_command(*args, "--first-version-reason", reason, stdout=out)
    second = ModelVersion.objects.exclude(pk=first.pk).get()
    assert second.status == ModelVersion.Status.CANDIDATE  # a version was active: the gate holds
    assert "promoted anyway" not in out.getvalue()
