"""Training runs: requesting, executing (real LoRA steps on a tiny GPT-2), cancelling, time limits, reaping."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from finetune.models import ModelVersion, ModelVersionEvent, TrainingRun
from finetune.services.model_versions import MODEL_CHANGED_EVENT
from finetune.services.training_runs import (
    training_run_cancel,
    training_run_execute,
    training_run_request,
    training_runs_reap_stale,
)
from supportbot.errors import ApplicationError
from tests.factories import TicketFactory, TicketMessageFactory, TrainingRunFactory, UserFactory
from tests.finetune.fixtures import EXCHANGES, FAST, ModelEvents, dataset_version_create, version_with_files

pytestmark = pytest.mark.django_db


def test_second_retrain_is_refused_while_one_is_live(model_store, dataset_dir, django_capture_on_commit_callbacks):
    dataset = dataset_version_create(dataset_dir)
    admin = UserFactory(username="boss")
    with django_capture_on_commit_callbacks() as callbacks:
        run = training_run_request(actor=admin, hyperparameters={"epochs": 1, "lora_r": 4})
    assert run.status == TrainingRun.Status.QUEUED
    assert run.dataset_version == dataset  # the newest dataset by default
    assert run.hyperparameters["epochs"] == 1.0
    assert run.hyperparameters["lora_r"] == 4
    assert run.hyperparameters["auto_promote"] is True
    assert run.requested_by == admin
    assert len(callbacks) == 1  # sent to the broker only after commit

    with pytest.raises(ApplicationError, match=rf"Run #{run.pk} is already queued; only one training run at a time"):
        training_run_request(actor=admin)
    assert TrainingRun.objects.count() == 1

    training_run_cancel(run=run, actor=admin)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELLED
    assert "Cancelled by boss" in run.log_tail
    assert training_run_request(actor=admin, enqueue=False).status == TrainingRun.Status.QUEUED


def test_request_refuses_bad_input_with_what_to_do(model_store, dataset_dir, tmp_path):
    with pytest.raises(ApplicationError, match="no dataset yet. Build one from the imported tickets"):
        training_run_request()
    dataset = dataset_version_create(dataset_dir)
    with pytest.raises(ApplicationError, match="lora_r=0 is outside"):
        training_run_request(hyperparameters={"lora_r": 0})
    with pytest.raises(ApplicationError, match="Unknown training settings: target_modules"):
        training_run_request(hyperparameters={"target_modules": ["c_fc"]})
    dataset.path = str(tmp_path / "gone")
    dataset.save()
    with pytest.raises(ApplicationError, match="files of dataset .* are missing"):
        training_run_request(dataset_version=dataset)
    assert not TrainingRun.objects.exists()


def test_cancel_of_a_finished_run_is_refused():
    run = TrainingRunFactory(status=TrainingRun.Status.SUCCEEDED)
    with pytest.raises(ApplicationError, match="already succeeded"):
        training_run_cancel(run=run)


def test_run_trains_creates_a_version_and_promotes_the_first(
    transactional_db, model_store, dataset_dir, fast_heartbeat, tiny_base, quality_gate_advisory
):
    dataset = dataset_version_create(dataset_dir)
    listener = ModelEvents()
    run = training_run_request(hyperparameters=FAST, enqueue=False)
    seen = []
    run = training_run_execute(run_id=run.pk, on_progress=seen.append)

    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.progress == 1.0
    assert run.current_step == run.total_steps > 0
    assert run.base_model == str(tiny_base.resolve())  # the resolved base is recorded
    assert run.loss_history
    assert run.loss_history[-1]["step"] == run.total_steps
    assert run.eval_metrics["eval_loss"] is not None
    assert run.heartbeat_at is not None
    assert run.started_at <= run.finished_at
    assert "is now active" in run.log_tail
    assert seen  # the caller's progress hook saw every event too
    assert not (model_store / "runs" / str(run.pk)).exists()  # working files moved or removed

    version = ModelVersion.objects.get(training_run=run)
    assert version.status == ModelVersion.Status.ACTIVE
    assert version.dataset_version == dataset
    assert version.base_model == run.base_model
    assert Path(version.adapter_path, "adapter_model.safetensors").exists()
    assert Path(version.merged_path, "config.json").exists()
    assert Path(version.adapter_path) == model_store.resolve() / "versions" / "v1" / "adapter"
    assert version.gate_results["passed"] is True
    event = version.events.get(action=ModelVersionEvent.Action.PROMOTED)
    assert event.automatic
    assert event.actor is None
    message = listener.receive()
    assert message["type"] == MODEL_CHANGED_EVENT
    assert message["version_id"] == version.pk
    assert message["label"] == "v1"
    assert message["merged_path"] == version.merged_path
    listener.close()

    # A repeated delivery of the same task does nothing.
    again = training_run_execute(run_id=run.pk)
    assert again.status == TrainingRun.Status.SUCCEEDED
    assert again.finished_at == run.finished_at
    assert ModelVersion.objects.count() == 1


def test_corrupt_dataset_fails_the_run_and_leaves_the_active_version(
    transactional_db, model_store, dataset_dir, fast_heartbeat, tmp_path
):
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    dataset_version_create(dataset_dir)
    for arrow in dataset_dir.glob("train/*.arrow"):
        arrow.write_bytes(b"garbage")
    run = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)

    assert run.status == TrainingRun.Status.FAILED
    assert "cannot be read" in run.error
    assert "build_dataset" in run.error
    assert run.finished_at is not None
    assert not (model_store / "runs" / str(run.pk)).exists()
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE
    assert ModelVersion.objects.count() == 1
    # The lane is free again.
    assert training_run_request(enqueue=False).status == TrainingRun.Status.QUEUED


def test_missing_base_model_fails_with_what_was_tried(
    transactional_db, model_store, dataset_dir, fast_heartbeat, settings, tmp_path
):
    settings.SUPPORTBOT_BASE_MODEL = str(tmp_path / "no-such-model")
    dataset_version_create(dataset_dir)
    run = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)
    assert run.status == TrainingRun.Status.FAILED
    assert "could not be found. Tried:" in run.error
    assert "SUPPORTBOT_BASE_MODEL" in run.error


def test_cancel_stops_a_running_run_at_the_next_step(transactional_db, model_store, dataset_dir, fast_heartbeat):
    dataset_version_create(dataset_dir)
    run = training_run_request(hyperparameters={**FAST, "epochs": 100}, enqueue=False)

    def cancel_at_step_two(event):
        if event.phase == "training" and event.step == 2:
            training_run_cancel(run=run)

    finished = training_run_execute(run_id=run.pk, on_progress=cancel_at_step_two)
    assert finished.status == TrainingRun.Status.CANCELLED
    assert finished.current_step < finished.total_steps
    assert "Cancel requested" in finished.log_tail
    assert not ModelVersion.objects.exists()
    assert not (model_store / "runs" / str(run.pk)).exists()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"soft_time_limit": 1, "time_limit": 60}, "soft time limit of 1 s"),  # the training loop stops
        ({"soft_time_limit": 600, "time_limit": 1}, "hard time limit of 1 s"),  # the watchdog stops it
    ],
    ids=["soft", "hard"],
)
def test_a_time_limit_fails_the_run_and_removes_its_files(
    transactional_db, model_store, dataset_dir, fast_heartbeat, limits, message
):
    dataset_version_create(dataset_dir)
    run = training_run_request(hyperparameters={**FAST, "epochs": 100}, enqueue=False)
    finished = training_run_execute(run_id=run.pk, **limits)
    assert finished.status == TrainingRun.Status.FAILED
    assert message in finished.error
    assert not (model_store / "runs" / str(run.pk)).exists()
    assert not ModelVersion.objects.exists()


def test_build_fresh_builds_a_dataset_from_the_tickets_first(
    transactional_db, model_store, fast_heartbeat, settings, tmp_path
):
    settings.SUPPORTBOT_DATASET_DIR = tmp_path / "datasets"
    for n, (question, answer) in enumerate(EXCHANGES):
        ticket = TicketFactory(intent=f"intent{n % 3}")
        TicketMessageFactory(ticket=ticket, position=0, body=question)
        TicketMessageFactory(ticket=ticket, position=1, role="agent", body=answer)
    admin = UserFactory(username="builder")
    run = training_run_request(actor=admin, build_fresh=True, hyperparameters=FAST, enqueue=False)
    assert run.dataset_version is None
    run = training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.dataset_version.created_by == admin
    assert run.dataset_version.num_train + run.dataset_version.num_validation == len(EXCHANGES)
    assert ModelVersion.objects.get(training_run=run).dataset_version == run.dataset_version
    assert f"Built dataset {run.dataset_version.name}" in run.log_tail


def test_reaper_fails_runs_with_a_stale_heartbeat_and_removes_their_files(model_store, tmp_path):
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    now = timezone.now()
    dead = TrainingRunFactory(status=TrainingRun.Status.RUNNING, heartbeat_at=now - timedelta(minutes=10))
    alive = TrainingRunFactory(status=TrainingRun.Status.RUNNING, heartbeat_at=now, lane="other")
    files = model_store.resolve() / "runs" / str(dead.pk)
    (files / "adapter").mkdir(parents=True)
    dead.output_dir = str(files)
    dead.save()

    reaped = training_runs_reap_stale(stale_after=timedelta(minutes=2))

    assert [r.pk for r in reaped] == [dead.pk]
    dead.refresh_from_db()
    alive.refresh_from_db()
    assert dead.status == TrainingRun.Status.FAILED
    assert "stopped responding" in dead.error
    assert "active model is unchanged" in dead.error
    assert alive.status == TrainingRun.Status.RUNNING
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE


def test_reaper_never_deletes_outside_the_store(model_store, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    TrainingRunFactory(
        status=TrainingRun.Status.RUNNING, heartbeat_at=timezone.now() - timedelta(hours=1), output_dir=str(outside)
    )
    training_runs_reap_stale(stale_after=timedelta(minutes=1))
    assert outside.exists()
