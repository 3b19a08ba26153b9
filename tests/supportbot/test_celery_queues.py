"""Training and everything else run on separate Celery queues, through a real Redis broker and real workers.

The tasks are sent by a separate process configured as production is (only the queue
names are made unique, so no other worker on this Redis can take them); the test reads
the broker's own lists to see where each message landed, then lets a training worker
and a default worker consume them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import redis

from finetune.models import TrainingRun
from tests.conftest import ROOT, celery_worker_command, child_process_env, stop_process
from tests.factories import TrainingRunFactory

pytestmark = pytest.mark.django_db(transaction=True)

SEND = """
import json
import django
django.setup()
from celery import current_app
from supportbot.tasks import ping
from finetune.services.training_runs import RETRAIN_TASK

retrain = current_app.send_task(RETRAIN_TASK, args=[{run_id}])  # no queue given: the routes decide
other = ping.delay()
print(json.dumps({{"retrain": retrain.id, "ping": other.id}}))
"""


def _queue_names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"test-default-{tag}", f"test-training-{tag}"


def _env(default: str, training: str) -> dict[str, str]:
    return child_process_env(SUPPORTBOT_CELERY_QUEUE=default, SUPPORTBOT_TRAINING_QUEUE=training)


def _start_worker(queue: str, env: dict[str, str], log):
    process = subprocess.Popen(
        celery_worker_command(queue, f"{queue}@%h"), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 90
    while "ready." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            pytest.fail(f"Celery worker for {queue} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return process


def _waiting(broker: redis.Redis, queue: str) -> list[str]:
    """Task names of the messages waiting in ``queue`` (kombu keeps a queue as a Redis list of that name)."""
    return [json.loads(raw)["headers"]["task"] for raw in broker.lrange(queue, 0, -1)]


def test_training_goes_to_the_training_queue_and_the_rest_to_default(redis_url, postgres, tmp_path):
    from supportbot.celery import app

    default, training = _queue_names()
    env = _env(default, training)
    # A run that already finished: the retrain task is idempotent per run and returns at once.
    run = TrainingRunFactory(status=TrainingRun.Status.SUCCEEDED)
    sent = subprocess.run(
        [sys.executable, "-c", SEND.format(run_id=run.pk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    ids = json.loads(sent.stdout.strip().splitlines()[-1])
    broker = redis.Redis.from_url(redis_url)
    try:
        assert _waiting(broker, training) == ["finetune.retrain"]
        assert _waiting(broker, default) == ["supportbot.ping"]

        # A training worker takes only the training queue: the ping stays for a default worker.
        trainer_log = tmp_path / "training-worker.log"
        trainer = _start_worker(training, env, trainer_log)
        try:
            outcome = app.AsyncResult(ids["retrain"]).get(timeout=90)
            assert outcome == {"run_id": run.pk, "status": "succeeded", "version": None}
            assert _waiting(broker, default) == ["supportbot.ping"]
        finally:
            stop_process(trainer)
        assert ids["retrain"] in trainer_log.read_text()

        worker_log = tmp_path / "default-worker.log"
        worker = _start_worker(default, env, worker_log)
        try:
            pong = app.AsyncResult(ids["ping"]).get(timeout=90)
            assert pong["pid"] == worker.pid
        finally:
            stop_process(worker)
        assert ids["retrain"] not in worker_log.read_text()
    finally:
        broker.delete(default, training)


def test_retrain_requests_go_to_the_configured_training_queue(redis_url, postgres, settings):
    """The service names the queue itself, so a retrain lands there whatever the routes say."""
    from finetune.services.training_runs import _training_run_enqueue

    default, training = _queue_names()
    settings.SUPPORTBOT_TRAINING_QUEUE = training
    run = TrainingRunFactory(status=TrainingRun.Status.QUEUED)
    broker = redis.Redis.from_url(redis_url)
    try:
        _training_run_enqueue(run.pk, uuid.uuid4().hex)
        assert _waiting(broker, training) == ["finetune.retrain"]
    finally:
        broker.delete(training)


def test_queue_settings_for_long_training(redis_url):
    from django.conf import settings

    from supportbot.celery import app

    assert app.conf.task_default_queue == settings.CELERY_TASK_DEFAULT_QUEUE
    assert app.amqp.router.route({}, "finetune.retrain")["queue"].name == settings.SUPPORTBOT_TRAINING_QUEUE
    assert app.amqp.router.route({}, "supportbot.ping")["queue"].name == settings.CELERY_TASK_DEFAULT_QUEUE
    # A training worker reserves one message: a second run waits in the broker for a free worker.
    assert app.conf.worker_prefetch_multiplier == 1
    # Redis hands an unacknowledged message to another worker after the visibility timeout:
    # it must outlast the longest run Celery lets live.
    assert app.conf.broker_transport_options["visibility_timeout"] > settings.SUPPORTBOT_TRAINING_TIME_LIMIT
