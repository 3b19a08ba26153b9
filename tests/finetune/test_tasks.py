"""``retrain`` through a real Celery worker process: success, failure, a killed worker, redelivery."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from celery.result import AsyncResult
from django.conf import settings as django_settings

from finetune.models import ModelVersion, TrainingRun
from finetune.services.training_runs import RETRAIN_TASK, training_run_request, training_runs_reap_stale
from finetune.tasks import retrain
from supportbot.errors import ApplicationError
from tests.finetune.fixtures import (
    EXCHANGES,
    FAST,
    conversation,
    dataset_version_create,
    version_with_files,
    wait_for,
    write_dataset,
)

pytestmark = pytest.mark.slow


def finished(run_id: int, timeout: float = 90) -> TrainingRun:
    def done():
        run = TrainingRun.objects.get(pk=run_id)
        return run if not run.is_live else None

    return wait_for(done, timeout=timeout, message=f"run #{run_id} to finish")


def test_the_service_queues_the_task_this_module_defines():
    assert retrain.name == RETRAIN_TASK  # the service sends it by name, without importing this interface


def test_retrain_in_a_worker_promotes_then_a_corrupt_dataset_fails_without_harm(
    model_store, dataset_dir, quality_gate_advisory, training_worker, tmp_path
):
    worker = training_worker()
    dataset_version_create(dataset_dir)
    run = training_run_request(hyperparameters=FAST)
    with pytest.raises(ApplicationError, match="only one training run at a time"):
        training_run_request(hyperparameters=FAST)

    run = finished(run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, f"{run.error}\n{worker.text()[-3000:]}"
    outcome = AsyncResult(run.celery_task_id).get(timeout=30)
    assert outcome == {"run_id": run.pk, "status": "succeeded", "version": "v1"}
    v1 = ModelVersion.objects.get(status=ModelVersion.Status.ACTIVE)
    assert v1.training_run == run
    assert Path(v1.merged_path, "model.safetensors").exists()

    broken = write_dataset(tmp_path / "broken", [conversation(q, a) for q, a in EXCHANGES[:4]], [], None)
    for arrow in broken.glob("train/*.arrow"):
        arrow.write_bytes(b"\x00not arrow")
    bad = finished(training_run_request(dataset_version=dataset_version_create(broken), hyperparameters=FAST).pk)
    assert bad.status == TrainingRun.Status.FAILED
    assert "cannot be read" in bad.error
    assert ModelVersion.objects.get(status=ModelVersion.Status.ACTIVE) == v1
    assert ModelVersion.objects.count() == 1


def test_killed_worker_fails_the_run_and_a_redelivery_does_not_rerun_it(
    model_store, dataset_dir, training_worker, tmp_path
):
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    dataset_version_create(dataset_dir)
    worker = training_worker()
    run = training_run_request(hyperparameters={**FAST, "epochs": 100})
    run_dir = model_store.resolve() / "runs" / str(run.pk)

    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).current_step >= 2, timeout=90, message="training steps")
    assert run_dir.is_dir()  # the run has files on disk
    worker.kill()
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING  # nobody has noticed yet
    started_at = run.started_at

    # Once its last heartbeat is a second old, the reaper takes it.
    reaped = wait_for(
        lambda: training_runs_reap_stale(stale_after=timedelta(seconds=1)), timeout=30, message="the run to be reaped"
    )
    assert [r.pk for r in reaped] == [run.pk]
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED
    assert "stopped responding" in run.error
    assert not run_dir.exists()
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE
    assert not ModelVersion.objects.exclude(pk=active.pk).exists()

    # The task was acks_late and never acknowledged: it comes back. It must not train again.
    if django_settings.REDIS_URL:
        # Redis gives unacked messages back after the visibility timeout; a worker with a short one
        # restores them when it starts.
        training_worker(
            queue=worker.queue,
            CELERY_VISIBILITY_TIMEOUT="3",
            SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT="1",
            SUPPORTBOT_TRAINING_TIME_LIMIT="2",
        )
        outcome = AsyncResult(run.celery_task_id).get(timeout=60)
    else:
        # The file broker drops a message its consumer took; deliver the same task again in-process.
        outcome = retrain.apply(args=[run.pk], task_id=run.celery_task_id).get()
    assert outcome == {"run_id": run.pk, "status": "failed", "version": None}
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED
    assert run.started_at == started_at
    assert "stopped responding" in run.error
    assert not run_dir.exists()
    assert ModelVersion.objects.count() == 1
