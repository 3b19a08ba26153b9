"""``retrain`` through a real Celery worker process: success, failure, a killed worker, redelivery."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
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


def finished(run_id: int, timeout: float = 600) -> TrainingRun:
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


def test_a_promotion_by_the_worker_reaches_a_chat_server_on_the_in_memory_layer(
    model_store, dataset_dir, model_gates_advisory, training_worker, tiny_base, daphne_factory
):
    """The embedded default: each process has its own in-memory channel layer, so the worker's
    ``model.changed`` event never reaches daphne. daphne must still converge on the version
    the worker promoted (checking the active version itself), and /healthz says when it has not."""
    from tests.conversations.test_real_server import chat_token, health, is_done, open_socket, until
    from tests.factories import ModelVersionFactory

    v1 = ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, base_model=str(tiny_base), merged_path=str(tiny_base), adapter_path=""
    )
    base = daphne_factory(
        REDIS_URL="",  # the default: in-memory channel layer, one per process
        SUPPORTBOT_MODEL_CHECK_S="1",
        SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD="-1000",
        SUPPORTBOT_REVIEW_SAMPLE_SHARE="0",
    )
    wait_for(lambda: health(base)["checks"]["model"]["this_process"]["serving"] == v1.label, timeout=120)
    assert health(base)["status"] == "ok"

    dataset_version_create(dataset_dir)
    worker = training_worker()
    run = finished(training_run_request(hyperparameters=FAST).pk, timeout=240)
    assert run.status == TrainingRun.Status.SUCCEEDED, f"{run.error}\n{worker.text()[-3000:]}"
    # The automatic promotion follows the run's end (after the bias probe).
    v2 = wait_for(
        lambda: ModelVersion.objects.filter(training_run=run, status=ModelVersion.Status.ACTIVE).first(),
        timeout=300,
        message=f"the worker to promote the new version: {TrainingRun.objects.get(pk=run.pk).log_tail[-500:]}",
    )

    def converged():
        report = health(base)
        model = report["checks"]["model"]
        here = model["this_process"]
        # Never "ok" while this process serves v1 and is not loading v2.
        if here["serving"] != v2.label and here["loading"] != v2.label:
            assert report["status"] != "ok", report
            assert model["ok"] is False, report
        return here["serving"] == v2.label and report["status"] == "ok"

    wait_for(converged, timeout=120, interval=0.5, message=f"daphne to serve {v2.label}")

    async def ask() -> dict:
        token = await asyncio.to_thread(chat_token, base)
        ws, _ = await open_socket(base, token)
        await ws.send(json.dumps({"type": "message", "client_id": "c-1", "text": "Where is my order?"}))
        done = (await until(ws, is_done))[-1]
        await ws.close()
        return done

    reply = async_to_sync(ask)()
    assert reply["status"] == "complete", reply
    assert reply["model_version"] == v2.label


def test_a_running_worker_fails_a_killed_workers_run_on_its_own_timer(
    model_store, dataset_dir, training_worker, tmp_path
):
    """kill -9 mid-training while another worker runs (its start-up check long done): the run
    is failed by that worker's periodic reaper, not left ``running`` until the next restart."""
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE)
    weights = Path(active.merged_path, "model.safetensors")
    weights.write_bytes(b"the active model's weights")
    dataset_version_create(dataset_dir)
    timers = {"SUPPORTBOT_TRAINING_STALE_AFTER": "10", "SUPPORTBOT_TRAINING_REAP_INTERVAL_S": "1"}
    trainer = training_worker(**timers)
    run = training_run_request(hyperparameters={**FAST, "epochs": 100})
    run_dir = model_store.resolve() / "runs" / str(run.pk)
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).current_step >= 2, timeout=120, message="training steps")
    bystander = training_worker(**timers)  # started while the run is healthy: its start-up check finds nothing
    assert "Marked training run" not in bystander.text()

    trainer.kill()
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING

    failed = wait_for(
        lambda: TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.FAILED).first(),
        timeout=150,
        message="the dead run to be failed by the running worker",
    )
    assert "stopped responding" in failed.error
    assert f"Marked training run #{run.pk} failed" in bystander.text()
    assert not run_dir.exists()
    active.refresh_from_db()
    assert active.status == ModelVersion.Status.ACTIVE
    assert weights.read_bytes() == b"the active model's weights"
    assert not ModelVersion.objects.exclude(pk=active.pk).exists()
    assert bystander.process.poll() is None  # the reaper lives beside the worker, it does not stop it
