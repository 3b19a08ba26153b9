"""The import_tickets and build_dataset management commands: options, output, errors."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from datasets import load_from_disk
from django.core.management import CommandError, call_command

from finetune.models import DatasetVersion, Ticket
from tests.finetune.test_importers import write_broken_csv

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
