"""Celery tasks of the fine-tuning app: ``retrain(run_id)``, and reaping dead runs in every worker
(at start, then periodically).

Run training workers with ``--pool=solo`` (``make worker``): torch and OpenMP can
hang in a forked prefork child, and one training uses every core anyway.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready

from finetune.services.training_runs import RETRAIN_TASK

log = logging.getLogger(__name__)


@shared_task(
    bind=True,
    name=RETRAIN_TASK,
    # Acknowledge only when done, and give the message back if the worker process is
    # lost: a run is never silently dropped. A repeated delivery is harmless because
    # training_run_execute only starts a run that is still queued.
    acks_late=True,
    reject_on_worker_lost=True,
    # No automatic retries: a failed run is recorded with its reason, and an admin retrains.
    max_retries=0,
)
def retrain(self, run_id: int) -> dict:
    """Train the queued run ``run_id`` to its end. The service does all the work.

    Soft and hard time limits come from settings (SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT,
    SUPPORTBOT_TRAINING_TIME_LIMIT) and travel with each message
    (``training_run_request`` sets them); Celery's prefork pool enforces them, and
    the service enforces them itself under the solo pool, where Celery cannot.
    """
    from .selectors import model_version_of_run
    from .services.training_runs import training_run_execute

    hard, soft = (self.request.timelimit or (None, None))[:2]
    run = training_run_execute(
        run_id=run_id,
        task_id=self.request.id or "",
        soft_time_limit=int(soft) if soft else None,
        time_limit=int(hard) if hard else None,
    )
    version = model_version_of_run(run)
    return {"run_id": run.pk, "status": run.status, "version": version.label if version else None}


@worker_ready.connect
def _reap_stale_runs_on_start(**kwargs) -> None:
    """A worker that starts may be the replacement of one that died mid-run: fail its runs now,
    and from then on every ``SUPPORTBOT_TRAINING_REAP_INTERVAL_S`` (a run whose worker dies
    later, or whose heartbeat was still fresh now, is failed within a minute or two)."""
    from .services.training_runs import stale_run_reaper_start, training_runs_reap_stale

    try:
        for run in training_runs_reap_stale():
            log.warning("Marked training run #%s failed: its worker had died", run.pk)
    except Exception:  # a database hiccup at start-up must not stop the worker from serving
        log.exception("Could not check for training runs of dead workers")
    stale_run_reaper_start()
