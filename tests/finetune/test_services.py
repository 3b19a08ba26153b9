"""Training-run and model-version services: real runs on a tiny GPT-2, real rows, real channel layer."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from finetune import services
from finetune.models import ModelVersion, ModelVersionEvent, TrainingRun
from finetune.services import (
    MODEL_CHANGED_EVENT,
    MODEL_EVENTS_GROUP,
    GateResult,
    model_version_promote,
    model_version_rollback,
    training_run_cancel,
    training_run_execute,
    training_run_request,
    training_runs_reap_stale,
)
from supportbot.errors import ApplicationError
from tests.factories import ModelVersionFactory, TrainingRunFactory, UserFactory
from tests.finetune.conftest import FAST, dataset_version_create, version_with_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def fast_heartbeat(settings):
    settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = 0.2
    settings.SUPPORTBOT_TRAINING_STALE_AFTER = 5


class ModelEvents:
    """A channel in the ``models`` group, as a chat server has."""

    def __init__(self):
        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(MODEL_EVENTS_GROUP, self.channel)

    def receive(self) -> dict:
        import asyncio

        async def get():
            return await asyncio.wait_for(self.layer.receive(self.channel), timeout=5)

        return async_to_sync(get)()

    def close(self):
        async_to_sync(self.layer.group_discard)(MODEL_EVENTS_GROUP, self.channel)


# --- requesting -------------------------------------------------------------------------------


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
    with pytest.raises(ApplicationError, match="no dataset yet.*build_dataset"):
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


# --- executing --------------------------------------------------------------------------------


def test_run_trains_creates_a_version_and_promotes_the_first(
    transactional_db, model_store, dataset_dir, fast_heartbeat, tiny_base
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


def test_worse_candidate_fails_the_gate_and_needs_a_reason(transactional_db, model_store, dataset_dir, fast_heartbeat):
    dataset_version_create(dataset_dir)
    first = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)
    v1 = ModelVersion.objects.get(training_run=first)
    assert v1.status == ModelVersion.Status.ACTIVE

    # Barely trained: worse than v1 on the same validation set.
    weak = {**FAST, "epochs": 0.1, "learning_rate": 1e-6}
    second = training_run_execute(run_id=training_run_request(hyperparameters=weak, enqueue=False).pk)
    assert second.status == TrainingRun.Status.SUCCEEDED
    v2 = ModelVersion.objects.get(training_run=second)
    v1.refresh_from_db()
    assert v2.status == ModelVersion.Status.CANDIDATE
    assert v1.status == ModelVersion.Status.ACTIVE
    gate = v2.gate_results["gates"]["validation_loss"]
    assert gate["passed"] is False
    assert "worse than v1" in gate["detail"]
    assert gate["values"]["active"] == pytest.approx(v1.metrics["eval_loss"])
    assert "stays a candidate" in second.log_tail

    admin = UserFactory(username="lead")
    with pytest.raises(ApplicationError, match="failed gates: validation_loss.*give a reason"):
        model_version_promote(version=v2, actor=admin)
    v2.refresh_from_db()
    assert v2.status == ModelVersion.Status.CANDIDATE

    model_version_promote(version=v2, actor=admin, reason="Smaller replies wanted for the launch")
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v1.status, v2.status) == (ModelVersion.Status.RETIRED, ModelVersion.Status.ACTIVE)
    assert v2.promoted_by == admin
    event = v2.events.get(action=ModelVersionEvent.Action.PROMOTED)
    assert event.gates_overridden
    assert event.actor == admin
    assert event.reason == "Smaller replies wanted for the launch"
    assert event.previous == v1
    assert event.gate_results["passed"] is False

    # One click back to the version that served before.
    listener = ModelEvents()
    model_version_rollback(actor=admin)
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v1.status, v2.status) == (ModelVersion.Status.ACTIVE, ModelVersion.Status.RETIRED)
    rolled = v1.events.get(action=ModelVersionEvent.Action.ROLLED_BACK)
    assert rolled.previous == v2
    assert rolled.actor == admin
    assert listener.receive()["label"] == "v1"
    listener.close()


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


def test_soft_time_limit_fails_the_run(transactional_db, model_store, dataset_dir, fast_heartbeat):
    dataset_version_create(dataset_dir)
    run = training_run_request(hyperparameters={**FAST, "epochs": 100}, enqueue=False)
    finished = training_run_execute(run_id=run.pk, soft_time_limit=1, time_limit=60)
    assert finished.status == TrainingRun.Status.FAILED
    assert "soft time limit of 1 s" in finished.error
    assert not ModelVersion.objects.exists()


def test_a_registered_gate_blocks_automatic_promotion(
    transactional_db, model_store, dataset_dir, fast_heartbeat, monkeypatch
):
    monkeypatch.setattr(services, "_PROMOTION_GATES", dict(services._PROMOTION_GATES))

    @services.promotion_gate_register("fairness")
    def fairness(candidate, active):
        return GateResult(False, "Typo-laden customers get worse answers.")

    dataset_version_create(dataset_dir)
    run = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)
    version = ModelVersion.objects.get(training_run=run)
    assert version.status == ModelVersion.Status.CANDIDATE
    assert version.gate_results["gates"]["validation_loss"]["passed"] is True
    assert version.gate_results["gates"]["fairness"] == {
        "passed": False,
        "detail": "Typo-laden customers get worse answers.",
        "values": {},
    }
    assert "fairness: Typo-laden" in run.log_tail


# --- reaping ----------------------------------------------------------------------------------


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


# --- promotion and rollback without training -------------------------------------------------------


def test_rollback_restores_any_version_that_served(tmp_path):
    measured = {"eval_loss": 1.0, "validation_fingerprint": "same-set"}
    v1 = version_with_files(tmp_path, metrics=measured)
    v2 = version_with_files(tmp_path, metrics=measured)
    v3 = version_with_files(tmp_path)  # never evaluated: fails the gate
    model_version_promote(version=v1)
    model_version_promote(version=v2)  # equal loss on the same set passes
    with pytest.raises(ApplicationError, match="no validation loss.*give a reason"):
        model_version_promote(version=v3)
    model_version_rollback(to_version=v1)
    assert ModelVersion.objects.get(status="active") == v1

    with pytest.raises(ApplicationError, match="never served customers"):
        model_version_rollback(to_version=v3)
    with pytest.raises(ApplicationError, match="already the active version"):
        model_version_rollback(to_version=ModelVersion.objects.get(status="active"))


def test_rollback_without_an_earlier_version_is_refused(tmp_path):
    with pytest.raises(ApplicationError, match="No version is active"):
        model_version_rollback()
    v1 = version_with_files(tmp_path, metrics={"eval_loss": 1.0})
    model_version_promote(version=v1)
    with pytest.raises(ApplicationError, match="no earlier one to roll back to"):
        model_version_rollback()


def test_promotion_refuses_a_version_whose_files_are_gone(tmp_path):
    version = ModelVersionFactory(metrics={"eval_loss": 1.0}, adapter_path=str(tmp_path / "gone"))
    with pytest.raises(ApplicationError, match="files of v.* are missing"):
        model_version_promote(version=version)
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.CANDIDATE


def test_rollback_to_a_chosen_earlier_version(tmp_path):
    versions = [version_with_files(tmp_path, metrics={"eval_loss": 1.0}) for _ in range(3)]
    admin = UserFactory()
    model_version_promote(version=versions[0])
    for version in versions[1:]:
        model_version_promote(version=version, actor=admin, reason="manual")
    model_version_rollback(actor=admin, to_version=versions[0], reason="v3 and v2 misbehave")
    states = {v.number: v.status for v in ModelVersion.objects.all()}
    assert states == {versions[0].number: "active", versions[1].number: "retired", versions[2].number: "retired"}
    event = ModelVersionEvent.objects.filter(action="rolled_back").get()
    assert event.reason == "v3 and v2 misbehave"
    assert event.previous == versions[2]


def test_hard_time_limit_fails_the_run_from_the_watchdog(transactional_db, model_store, dataset_dir, fast_heartbeat):
    dataset_version_create(dataset_dir)
    run = training_run_request(hyperparameters={**FAST, "epochs": 100}, enqueue=False)
    finished = training_run_execute(run_id=run.pk, soft_time_limit=600, time_limit=1)
    assert finished.status == TrainingRun.Status.FAILED
    assert "hard time limit of 1 s" in finished.error
    assert not (model_store / "runs" / str(run.pk)).exists()
    assert not ModelVersion.objects.exists()


def test_build_fresh_builds_a_dataset_from_the_tickets_first(
    transactional_db, model_store, fast_heartbeat, settings, tmp_path
):
    from tests.factories import TicketFactory, TicketMessageFactory
    from tests.finetune.conftest import EXCHANGES

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
