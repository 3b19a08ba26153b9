"""``manage.py finetune``: the same service as the admin, from the shell."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from finetune.models import ModelVersion, TrainingRun
from tests.factories import TrainingRunFactory
from tests.finetune.conftest import dataset_version_create, version_with_files

pytestmark = pytest.mark.django_db


def test_without_a_dataset_it_says_what_to_do(model_store):
    with pytest.raises(CommandError, match="no dataset yet.*build_dataset") as failure:
        call_command("finetune")
    assert failure.value.returncode == 3
    # Building one needs tickets: the run fails and says so.
    with pytest.raises(CommandError, match="import_tickets") as failure:
        call_command("finetune", "--build-fresh-if-missing")
    assert TrainingRun.objects.get().status == TrainingRun.Status.FAILED


def test_trains_and_promotes_with_a_progress_bar(transactional_db, model_store, dataset_dir, settings):
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
    assert "training:" in err.getvalue()  # tqdm's bar

    out = StringIO()
    call_command("finetune", "--skip-if-active", stdout=out)
    assert "v1 is already active" in out.getvalue()
    assert TrainingRun.objects.count() == 1


def test_a_failed_run_is_an_error(transactional_db, model_store, dataset_dir, settings, tmp_path):
    settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = 0.2
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    dataset_version_create(dataset_dir)
    for arrow in dataset_dir.glob("train/*.arrow"):
        arrow.write_bytes(b"junk")
    with pytest.raises(CommandError, match="failed: The dataset at .* cannot be read"):
        call_command("finetune", "--epochs", "1")
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE


def test_reap(model_store):
    dead = TrainingRunFactory(status=TrainingRun.Status.RUNNING, heartbeat_at=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("finetune", "--reap", stdout=out)
    dead.refresh_from_db()
    assert dead.status == TrainingRun.Status.FAILED
    assert "1 run(s) marked failed" in out.getvalue()
