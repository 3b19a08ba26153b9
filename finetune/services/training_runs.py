"""Training runs: requesting, cancelling, reaping and executing them.

- ``training_run_request``: one live run per lane (a partial unique constraint plus a
  lock), validated settings, queued on the broker after commit.
- ``training_run_execute``: what the worker runs: claims the run (idempotent per run id,
  so a redelivered task never runs a finished run again), trains with
  ``finetune.ml.training.train_lora`` while ``run_monitor`` records progress and a
  heartbeat, creates the candidate ``ModelVersion``, and promotes it when it passes the
  gates and the run asked for that. A failure never touches the active version.
- ``training_run_cancel``, ``training_runs_reap_stale`` (a worker that died), and
  ``stale_run_reaper_start``, the thread every worker runs to reap periodically.
- ``REQUESTABLE_SETTINGS``: what a person may choose per run; the retrain form and the
  ``finetune`` command build their fields from ``training_settings_requestable()``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.utils import timezone

from finetune import selectors
from finetune.models import DatasetVersion, ModelVersion, TrainingRun
from supportbot.db import advisory_lock
from supportbot.errors import ApplicationError
from supportbot.periodic import periodic_thread_start

from .bias import bias_report_start
from .datasets import dataset_version_build
from .gates import gate_failures_text, model_version_gates_evaluate, validation_reference_losses
from .model_versions import MODEL_VERSIONS_LOCK, model_version_promote
from .run_monitor import (
    ProgressRecorder,
    Watchdog,
    run_log_append,
    training_run_finish_if_running,
    training_run_mark_failed,
    training_run_note,
    worker_lost_message,
)

log = logging.getLogger(__name__)

# The Celery task that executes a run (``finetune.tasks.retrain``), sent by name: services
# do not import the interfaces that call them.
RETRAIN_TASK = "finetune.retrain"

# Settings a person may choose per run, with what each means; the rest of TrainConfig is
# fixed by the code. Interfaces name them their own way (form fields, command options).
REQUESTABLE_SETTINGS: dict[str, str] = {
    "epochs": "Passes over the training data (1-3 is usual).",
    "learning_rate": "Step size of the optimiser; LoRA's usual range is 1e-4 to 3e-4.",
    "lora_r": "Adapter rank r (8-32).",
    "lora_alpha": "LoRA scale alpha (usually twice the rank).",
    "lora_dropout": "Dropout on the adapter's input.",
    "max_examples": "Train on a sample of this many examples (default: all of them).",
    "max_length": "Tokens per example (the reply is always kept).",
    "batch_size": "Sequences per micro-batch.",
    "grad_accum_steps": "Micro-batches per optimiser step.",
    "warmup_ratio": "Share of the steps that warm up the learning rate.",
    "seed": "Seed of the sample, the data order and the adapter's start.",
    "max_eval_examples": "Validation examples for the loss.",
    "eval_generate_samples": "Validation replies generated and scored for the quality gate (ROUGE-L, intents).",
    "eval_max_new_tokens": "Longest reply generated when scoring.",
    "lora_layers": "LoRA on the top N layers only (empty: all); 8 of SmolLM2's 30 trains ~1.4x faster per CPU-second.",
    "grounding_neighbours": "Past answers shown in every prompt (0: no grounding).",
}


@dataclass(frozen=True)
class RequestableSetting:
    name: str
    type: type  # int or float
    default: int | float | None
    help: str


def training_settings_requestable() -> list[RequestableSetting]:
    """The per-run settings with their types and defaults (``TrainConfig``'s), in a stable order."""
    from finetune.ml.training import TrainConfig

    defaults = TrainConfig()
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    return [
        RequestableSetting(name, int if kinds[name].startswith("int") else float, getattr(defaults, name), text)
        for name, text in REQUESTABLE_SETTINGS.items()
    ]


# --- run files ---------------------------------------------------------------------------


def _model_store() -> Path:
    return Path(settings.SUPPORTBOT_MODEL_STORE).resolve()


def _run_dir(run_id: int) -> Path:
    return _model_store() / "runs" / str(run_id)


def _remove_run_files(path: str | Path | None) -> None:
    """Delete a run's working directory, and never anything outside the store's runs/ folder."""
    if not path:
        return
    target = Path(path).resolve()
    runs = _model_store() / "runs"
    if runs not in target.parents:
        log.warning("Not removing %s: it is outside %s", target, runs)
        return
    shutil.rmtree(target, ignore_errors=True)


# --- requesting, cancelling and reaping runs ----------------------------------------------------


def training_settings_validate(hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """The full set of per-run settings (defaults filled in), or ApplicationError saying what is wrong."""
    from finetune.ml.training import TrainConfig

    overrides = {k: v for k, v in (hyperparameters or {}).items() if v is not None and v != ""}
    unknown = sorted(set(overrides) - set(REQUESTABLE_SETTINGS))
    if unknown:
        raise ApplicationError(
            f"Unknown training settings: {', '.join(unknown)}. Allowed: {', '.join(REQUESTABLE_SETTINGS)}.",
            code="invalid_settings",
        )
    try:
        config = TrainConfig.from_overrides(overrides)
    except ValueError as exc:
        raise ApplicationError(str(exc), code="invalid_settings") from exc
    return {name: getattr(config, name) for name in REQUESTABLE_SETTINGS}


def training_run_request(
    *,
    actor=None,
    dataset_version: DatasetVersion | None = None,
    build_fresh: bool = False,
    hyperparameters: dict[str, Any] | None = None,
    auto_promote: bool = True,
    lane: str = TrainingRun.DEFAULT_LANE,
    enqueue: bool = True,
) -> TrainingRun:
    """Queue a training run, or refuse with a message if one is already queued or running.

    Without a dataset version and without ``build_fresh`` the newest dataset is used.
    ``enqueue=False`` leaves the run for the caller to execute (``manage.py finetune``).
    """
    chosen = training_settings_validate(hyperparameters)
    if build_fresh:
        dataset_version = None
    elif dataset_version is None:
        dataset_version = selectors.dataset_version_latest()
        if dataset_version is None:
            raise ApplicationError(
                "There is no dataset yet. Build one from the imported tickets, then retrain.", code="no_dataset"
            )
    if dataset_version is not None and not Path(dataset_version.path).is_dir():
        raise ApplicationError(
            f"The files of dataset {dataset_version.name} are missing ({dataset_version.path}). "
            "Rebuild the dataset or choose another version.",
            code="dataset_missing",
        )
    # A run whose worker died would otherwise block the lane until someone notices.
    training_runs_reap_stale()
    with transaction.atomic():
        advisory_lock(f"training-lane:{lane}")
        live = selectors.training_run_live(lane)
        if live is not None:
            raise _run_in_progress(live)
        try:
            with transaction.atomic():
                run = TrainingRun(
                    lane=lane,
                    status=TrainingRun.Status.QUEUED,
                    dataset_version=dataset_version,
                    build_fresh_dataset=build_fresh,
                    hyperparameters={**chosen, "auto_promote": bool(auto_promote)},
                    requested_by=actor if getattr(actor, "pk", None) else None,
                    celery_task_id=uuid.uuid4().hex if enqueue else "",
                )
                run_log_append(run, f"Queued by {_actor_name(actor)}")
                run.save(force_insert=True)
        except IntegrityError:
            # Another request won the race between the check above and this insert.
            raise _run_in_progress(selectors.training_run_live(lane)) from None
        if enqueue:
            transaction.on_commit(partial(_training_run_enqueue, run.pk, run.celery_task_id))
    return run


def _run_in_progress(live: TrainingRun | None) -> ApplicationError:
    what = f"Run #{live.pk} is already {live.get_status_display().lower()}" if live else "A run is already live"
    return ApplicationError(
        f"{what}; only one training run at a time. Wait for it to finish or cancel it, then retrain.",
        code="run_in_progress",
        extra={"run_id": live.pk if live else None},
    )


def _actor_name(actor) -> str:
    return getattr(actor, "username", "") or "the system"


def _training_run_enqueue(run_id: int, task_id: str) -> None:
    from celery import current_app
    from kombu.exceptions import OperationalError

    options: dict[str, Any] = {
        "task_id": task_id,
        # Enforced by Celery's prefork pool; with --pool=solo the task enforces them itself.
        "soft_time_limit": settings.SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT,
        "time_limit": settings.SUPPORTBOT_TRAINING_TIME_LIMIT,
    }
    if settings.SUPPORTBOT_TRAINING_QUEUE:
        options["queue"] = settings.SUPPORTBOT_TRAINING_QUEUE
    try:
        current_app.send_task(RETRAIN_TASK, args=[run_id], **options)
    except (OperationalError, OSError) as exc:
        # Left queued, the run would look alive forever and block the lane.
        TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
            status=TrainingRun.Status.FAILED,
            finished_at=timezone.now(),
            error=f"The task queue could not be reached ({exc}). Check that Redis (REDIS_URL) is up, then retrain.",
        )


def training_run_cancel(*, run: TrainingRun, actor=None) -> TrainingRun:
    """Cancel a queued run at once; ask a running one to stop at its next step."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        who = _actor_name(actor)
        if run.status == TrainingRun.Status.QUEUED:
            run.status = TrainingRun.Status.CANCELLED
            run.cancel_requested = True
            run.finished_at = timezone.now()
            run_log_append(run, f"Cancelled by {who} before it started")
            run.save(update_fields=["status", "cancel_requested", "finished_at", "log_tail"])
        elif run.status == TrainingRun.Status.RUNNING:
            if not run.cancel_requested:
                run.cancel_requested = True
                run_log_append(run, f"Cancel requested by {who}")
                run.save(update_fields=["cancel_requested", "log_tail"])
        else:
            raise ApplicationError(
                f"Run #{run.pk} has already {run.get_status_display().lower()}; there is nothing to cancel.",
                code="run_finished",
            )
    return run


def training_runs_reap_stale(*, stale_after: timedelta | None = None) -> list[TrainingRun]:
    """Mark running runs whose worker stopped sending heartbeats as failed, and delete their files.

    The active model version is never touched: a run only ever changes it by
    promoting its own version, which a dead run never got to.
    """
    if stale_after is None:
        stale_after = timedelta(seconds=settings.SUPPORTBOT_TRAINING_STALE_AFTER)
    cutoff = timezone.now() - stale_after
    stale = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    reaped: list[TrainingRun] = []
    for run_id in TrainingRun.objects.filter(stale, status=TrainingRun.Status.RUNNING).values_list("pk", flat=True):
        with transaction.atomic():
            run = TrainingRun.objects.select_for_update().filter(stale, pk=run_id, status="running").first()
            if run is None:
                continue  # it sent a heartbeat meanwhile, or someone else reaped it
            training_run_mark_failed(run, worker_lost_message(run))
            transaction.on_commit(partial(_remove_run_files, run.output_dir))
        reaped.append(run)
        log.warning("Training run #%s failed: its worker stopped sending heartbeats", run.pk)
    return reaped


def stale_run_reaper_start(*, interval_s: float | None = None) -> threading.Thread:
    """Run ``training_runs_reap_stale`` every ``interval_s`` (``SUPPORTBOT_TRAINING_REAP_INTERVAL_S``) in a thread.

    Every Celery worker starts one: a worker killed mid-run (kill -9, out of memory)
    leaves its run ``running`` with a frozen heartbeat, and the check at a worker's
    start is too early to see it stale. A thread rather than Celery's timer: the solo
    pool's timer waits while a training task holds the worker. Several workers reaping
    at once is harmless (the row is locked and rechecked).
    """
    interval = settings.SUPPORTBOT_TRAINING_REAP_INTERVAL_S if interval_s is None else interval_s

    def reap() -> None:
        for run in training_runs_reap_stale():
            log.warning("Marked training run #%s failed: its worker had died", run.pk)

    return periodic_thread_start(
        "training-run-reaper", interval, reap, "Could not check for training runs of dead workers"
    )


# --- executing a run ----------------------------------------------------------------------------


def _training_run_claim(run_id: int, task_id: str) -> TrainingRun | None:
    """Move a queued run to running; None (and nothing done) for any other state.

    This is the idempotency guard: Celery redelivers an acks_late task whose worker
    died, and the message must not run a finished, cancelled or reaped run again.
    """
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            log.warning("Training run #%s does not exist; nothing to do", run_id)
            return None
        if run.status == TrainingRun.Status.QUEUED:
            if run.cancel_requested:
                run.status = TrainingRun.Status.CANCELLED
                run.finished_at = timezone.now()
                run.save(update_fields=["status", "finished_at"])
                return None
            now = timezone.now()
            run.status = TrainingRun.Status.RUNNING
            run.started_at = now
            run.heartbeat_at = now
            run.celery_task_id = task_id or run.celery_task_id
            run.output_dir = str(_run_dir(run.pk))
            run_log_append(run, "Started")
            run.save(update_fields=["status", "started_at", "heartbeat_at", "celery_task_id", "output_dir", "log_tail"])
            return run
        if run.status == TrainingRun.Status.RUNNING:
            cutoff = timezone.now() - timedelta(seconds=settings.SUPPORTBOT_TRAINING_STALE_AFTER)
            if run.heartbeat_at is None or run.heartbeat_at < cutoff:
                # Delivered again after its worker died: the first attempt is over.
                training_run_mark_failed(run, worker_lost_message(run))
                transaction.on_commit(partial(_remove_run_files, run.output_dir))
            else:
                log.warning("Training run #%s is running elsewhere (fresh heartbeat); not starting it twice", run_id)
            return None
        log.info("Training run #%s is already %s; a repeated delivery does nothing", run_id, run.status)
        return None


def training_run_execute(
    *,
    run_id: int,
    task_id: str = "",
    on_progress: Callable[[Any], None] | None = None,
    soft_time_limit: int | None = None,
    time_limit: int | None = None,
) -> TrainingRun:
    """Run a queued training run to its end (succeeded, failed or cancelled) and return it.

    Idempotent per run id: any run that is not queued is left as it is. Expected
    failures (bad dataset, missing base model, time limit) end the run as failed
    with a message saying what to do; the active version is never touched by a
    failure.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    from finetune.ml.base_model import BaseModelNotFound, resolve_base_model
    from finetune.ml.training import DatasetError, TrainConfig, TrainingCancelled, train_lora

    run = _training_run_claim(run_id, task_id)
    if run is None:
        return TrainingRun.objects.get(pk=run_id)

    soft = soft_time_limit or settings.SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT
    hard = time_limit or settings.SUPPORTBOT_TRAINING_TIME_LIMIT
    started = time.monotonic()
    watchdog = Watchdog(run.pk, float(settings.SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL), started + hard, hard)
    watchdog.start()
    recorder = ProgressRecorder(run, on_progress)
    stop_reason = ""

    def should_stop() -> bool:
        nonlocal stop_reason
        if watchdog.halt.is_set():
            stop_reason = watchdog.reason
            return True
        if time.monotonic() - started > soft:
            stop_reason = "soft_time_limit"
            return True
        return False

    version: ModelVersion | None = None
    try:
        dataset = _training_dataset(run, recorder)
        resolved = resolve_base_model(settings.SUPPORTBOT_BASE_MODEL, _model_store())
        TrainingRun.objects.filter(pk=run.pk).update(base_model=resolved.name)
        run.base_model = resolved.name
        recorder.note(f"Base model: {resolved.name} ({resolved.path}); dataset: {dataset.name}")
        requested = {k: v for k, v in run.hyperparameters.items() if k in REQUESTABLE_SETTINGS}
        config = TrainConfig.from_overrides(requested, base_model=resolved.path, base_model_name=resolved.name)
        references = _quality_references()
        result = train_lora(
            config,
            dataset.path,
            _run_dir(run.pk),
            recorder,
            should_stop=should_stop,
            compare_with=[r[:3] for r in references],
        )
        metrics = dict(result.metrics)
        if references and metrics.get("quality", {}).get("rows", {}).get("active"):
            metrics["quality"]["active_version_id"] = references[0][3]
        metrics["reference_losses"] = validation_reference_losses(
            base_model=run.base_model, dataset_path=dataset.path, config=config, metrics=metrics, note=recorder.note
        )
        if should_stop():
            raise TrainingCancelled("stopped after training")
        version = _model_version_create(run=run, dataset=dataset, result=result, metrics=metrics)
        if settings.SUPPORTBOT_BIAS_PROBE_AFTER_TRAINING:
            # Still running (heartbeat on) while the candidate is probed: the run is done
            # when its candidate is judged, so nobody acts on a version half evaluated.
            version = _bias_probe_after_training(run, version)
            training_run_finish_if_running(run.pk, TrainingRun.Status.SUCCEEDED)
    except TrainingCancelled:
        if stop_reason == "cancel":
            training_run_finish_if_running(run.pk, TrainingRun.Status.CANCELLED, line="Cancelled; files removed")
        elif stop_reason == "soft_time_limit":
            training_run_finish_if_running(run.pk, TrainingRun.Status.FAILED, _soft_limit_message(soft))
        _remove_run_files(_run_dir(run.pk))
    except SoftTimeLimitExceeded:
        training_run_finish_if_running(run.pk, TrainingRun.Status.FAILED, _soft_limit_message(soft))
        _remove_run_files(_run_dir(run.pk))
    except (ApplicationError, BaseModelNotFound, DatasetError, FloatingPointError, ValueError) as exc:
        training_run_finish_if_running(run.pk, TrainingRun.Status.FAILED, str(exc), line=f"Failed: {exc}")
        _remove_run_files(_run_dir(run.pk))
    except Exception as exc:
        # Anything else is a bug or the machine (out of memory, disk full): record it
        # on the run for the admin, keep the traceback in the worker log.
        log.exception("Training run #%s failed", run.pk)
        message = f"{type(exc).__name__}: {exc}. The worker log has the details; the active model is unchanged."
        training_run_finish_if_running(run.pk, TrainingRun.Status.FAILED, message, line=f"Failed: {message}")
        _remove_run_files(_run_dir(run.pk))
    finally:
        watchdog.stop()

    if version is not None and run.hyperparameters.get("auto_promote", True):
        if version.gate_results.get("passed"):
            try:
                model_version_promote(version=version, automatic=True)
                training_run_note(run_id=run.pk, line=f"{version.label} passed the gates and is now active")
            except ApplicationError as exc:
                training_run_note(run_id=run.pk, line=f"{version.label} was not promoted: {exc}")
        else:
            training_run_note(
                run_id=run.pk, line=f"{version.label} stays a candidate: {gate_failures_text(version.gate_results)}"
            )
    return TrainingRun.objects.get(pk=run.pk)


def _quality_references() -> list[tuple[str, str, str, int]]:
    """The versions the candidate's replies are compared with on its validation sample: the active one.

    ``(row name, label, merged model directory, version id)``.
    """
    active = selectors.model_version_active()
    if active is None or not active.merged_path or not Path(active.merged_path).is_dir():
        return []
    return [("active", f"{active.label} (active)", active.merged_path, active.pk)]


def _bias_probe_after_training(run: TrainingRun, version: ModelVersion) -> ModelVersion:
    """Probe the new candidate for bias and evaluate its gates again with the report.

    Never fails the run: a probe that cannot run is recorded as an ``error`` report (and
    its gate then keeps the candidate from automatic promotion); nothing here raises.
    """
    from .bias import bias_probe_run

    training_run_note(run_id=run.pk, line=f"Probing {version.label} for bias (counterfactual requests)")
    try:
        pending = selectors.bias_report_latest(version)
        if pending is not None and pending.status != pending.Status.RUNNING:
            pending = None
        report = bias_probe_run(version=version, trigger="training_run", report=pending)
        line = f"Bias probe of {version.label}: {report.get_status_display().lower()}"
        if report.failures:
            line += f" ({len(report.failures)} flagged)"
        if report.error:
            line += f" ({report.error})"
        training_run_note(run_id=run.pk, line=line)
        model_version_gates_evaluate(version=version)
    except Exception as exc:  # recording the report itself failed (database gone): the run still succeeded
        log.exception("Recording the bias probe of %s failed", version.label)
        training_run_note(run_id=run.pk, line=f"Bias probe of {version.label} not recorded: {exc}")
    version.refresh_from_db()
    return version


def _soft_limit_message(soft: int) -> str:
    return (
        f"The run exceeded the soft time limit of {soft} s (SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT) and was stopped. "
        "Lower epochs or max examples, or raise the limit. The active model is unchanged."
    )


def _training_dataset(run: TrainingRun, recorder: ProgressRecorder) -> DatasetVersion:
    if not run.build_fresh_dataset:
        if run.dataset_version is None:
            raise ApplicationError("The run has no dataset version; retrain and choose one.", code="no_dataset")
        return run.dataset_version
    recorder.note("Building a fresh dataset")
    # An identical build returns the existing version instead of a copy.
    dataset = dataset_version_build(created_by=run.requested_by)
    TrainingRun.objects.filter(pk=run.pk).update(dataset_version=dataset)
    run.dataset_version = dataset
    recorder.note(f"Built dataset {dataset.name}: {dataset.num_train} train / {dataset.num_validation} validation")
    return dataset


def _model_version_create(*, run: TrainingRun, dataset: DatasetVersion, result, metrics: dict) -> ModelVersion:
    """Record the trained adapter as a candidate version and finish the run, in one transaction."""
    with transaction.atomic():
        advisory_lock(MODEL_VERSIONS_LOCK)
        locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if locked.status != TrainingRun.Status.RUNNING:
            from finetune.ml.training import TrainingCancelled

            raise TrainingCancelled(f"run is {locked.status}")
        number = (ModelVersion.objects.aggregate(top=Max("number"))["top"] or 0) + 1
        target = _model_store() / "versions" / f"v{number}"
        version = ModelVersion.objects.create(
            number=number,
            status=ModelVersion.Status.CANDIDATE,
            training_run=locked,
            dataset_version=dataset,
            base_model=run.base_model,
            adapter_path=str(target / "adapter"),
            merged_path=str(target / "merged") if result.merged_dir else "",
            metrics=metrics,
        )
        probing = settings.SUPPORTBOT_BIAS_PROBE_AFTER_TRAINING
        if probing:
            # Recorded with the version, so nobody promotes it before its probe is done;
            # the run stays running until then (training_run_execute finishes it).
            bias_report_start(version=version, trigger="training_run")
        gates = model_version_gates_evaluate(version=version)
        if not probing:
            locked.status = TrainingRun.Status.SUCCEEDED
            locked.finished_at = timezone.now()
        locked.progress = 1.0
        locked.eval_metrics = {k: v for k, v in metrics.items() if k not in {"loss_history"}}
        state = "passed the gates" if gates["passed"] else gate_failures_text(gates)
        if probing:
            state = "probing it for bias before the gates decide"
        run_log_append(locked, f"Saved as {version.label} (candidate); {state}")
        locked.save(update_fields=["status", "progress", "finished_at", "eval_metrics", "log_tail"])
        # Last, so a failure above leaves the files where the run's cleanup finds them.
        if target.exists():
            shutil.rmtree(target)  # left over from a version row that no longer exists
        target.mkdir(parents=True)
        Path(result.adapter_dir).replace(target / "adapter")
        if result.merged_dir:
            Path(result.merged_dir).replace(target / "merged")
        # What the version serves with besides its weights (finetune.ml.knowledge): the retrieval
        # index, the intent classifier and train_config.json's grounding/decoding/policy settings.
        for name in ("metrics.json", "train_config.json", "retrieval", "intent"):
            if (Path(result.output_dir) / name).exists():
                Path(result.output_dir, name).replace(target / name)
        transaction.on_commit(partial(_remove_run_files, result.output_dir))
    return version
