"""A training run's record while it runs: its log, its final status, and the threads that watch it.

- ``run_log_append``: the one way a line reaches a run's log (time-stamped, only the
  newest ``LOG_TAIL_LINES`` kept); ``training_run_note`` appends to a run's row by id.
- ``training_run_finish_if_running`` / ``training_run_mark_failed``: end a run with
  its reason in the log, unless something else ended it first.
- ``Watchdog``: heartbeat, cancel and hard-time-limit checks, off the training thread.
- ``ProgressRecorder``: the trainer's progress events, written to the row at most
  twice a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from finetune.models import TrainingRun

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 60  # lines of a run's log kept on its row, for the run page


def _stamp(line: str) -> str:
    return f"{timezone.now():%H:%M:%S} {line}"


def run_log_append(run: TrainingRun, *lines: str, stamped: bool = False) -> None:
    """Add ``lines`` to ``run.log_tail``, time-stamped now unless already ``stamped``; the caller saves the row.

    Only the newest ``LOG_TAIL_LINES`` are kept.
    """
    new = list(lines) if stamped else [_stamp(line) for line in lines]
    run.log_tail = "\n".join([*run.log_tail.splitlines(), *new][-LOG_TAIL_LINES:])


def training_run_note(*, run_id: int, line: str) -> None:
    """Add a line to a run's log whatever its status (used after it has finished)."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return
        run_log_append(run, line)
        run.save(update_fields=["log_tail"])


def training_run_mark_failed(run: TrainingRun, message: str) -> None:
    """End ``run`` (locked by the caller) as failed with ``message``."""
    run.status = TrainingRun.Status.FAILED
    run.error = message
    run.finished_at = timezone.now()
    run_log_append(run, f"Failed: {message}")
    run.save(update_fields=["status", "error", "finished_at", "log_tail"])


def training_run_finish_if_running(run_id: int, status: str, error: str = "", line: str = "") -> bool:
    """Move a running run to a final status, unless the reaper or a time limit already did."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id, status=TrainingRun.Status.RUNNING).first()
        if run is None:
            return False
        run.status = status
        run.error = error
        run.finished_at = timezone.now()
        if line:
            run_log_append(run, line)
        run.save(update_fields=["status", "error", "finished_at", "log_tail"])
    return True


def worker_lost_message(run: TrainingRun) -> str:
    seen = f"{run.heartbeat_at:%Y-%m-%d %H:%M:%S %Z}" if run.heartbeat_at else "never"
    return (
        f"The worker running this run stopped responding (last heartbeat: {seen}); it was probably killed or "
        "ran out of memory. Its files were removed and the active model is unchanged. Retrain to try again."
    )


class Watchdog(threading.Thread):
    """Heartbeat, cancel and hard-time-limit checks, off the training thread.

    It writes ``heartbeat_at`` every interval and raises a flag the training loop
    reads at each step when the run was cancelled, failed by someone else (the
    reaper), or ran past its hard time limit. It dies with the process, so a killed
    worker stops heartbeating, which is how the reaper knows.
    """

    def __init__(self, run_id: int, interval: float, hard_deadline: float | None, hard_limit: int | None):
        super().__init__(name=f"training-run-{run_id}-watchdog", daemon=True)
        self.run_id = run_id
        self.interval = interval
        self.hard_deadline = hard_deadline
        self.hard_limit = hard_limit
        self.finished = threading.Event()
        self.halt = threading.Event()
        self.reason = ""

    def run(self) -> None:
        try:
            while not self.finished.wait(self.interval):
                try:
                    self._beat()
                except DatabaseError:
                    log.exception("Heartbeat of training run #%s failed; retrying", self.run_id)
        finally:
            connection.close()  # this thread's own connection

    def _beat(self) -> None:
        if self.hard_deadline is not None and time.monotonic() > self.hard_deadline:
            self.reason = "hard_time_limit"
            training_run_finish_if_running(
                self.run_id,
                TrainingRun.Status.FAILED,
                f"The run exceeded the hard time limit of {self.hard_limit} s (SUPPORTBOT_TRAINING_TIME_LIMIT) and "
                "was stopped. Lower epochs or max examples, or raise the limit. The active model is unchanged.",
            )
            self.halt.set()
            return
        row = TrainingRun.objects.filter(pk=self.run_id).values("status", "cancel_requested").first()
        if row is None or row["status"] != TrainingRun.Status.RUNNING:
            self.reason = self.reason or "not_running"
            self.halt.set()
            return
        if row["cancel_requested"]:
            self.reason = "cancel"
            self.halt.set()
        TrainingRun.objects.filter(pk=self.run_id, status=TrainingRun.Status.RUNNING).update(
            heartbeat_at=timezone.now()
        )

    def stop(self) -> None:
        self.finished.set()
        if self.is_alive():
            self.join(timeout=self.interval + 5)


# What the run page says a phase does, when the trainer's event says no more.
PHASE_TEXTS = {
    "loading": "Loading the dataset and the base model",
    "evaluating_before": "Evaluating the base model",
    "training": "Training",
    "evaluating_after": "Evaluating the fine-tuned model",
    "evaluating_active": "Evaluating the active version",
    "saving": "Saving the adapter and the merged model",
    "done": "Done",
}


def phase_of(event) -> dict[str, Any]:
    """A progress event's phase in words with its own progress, as ``TrainingRun.phase`` keeps it:
    "Evaluating the base model: 12/32 replies", "Training: step 3/40"."""
    text = PHASE_TEXTS.get(event.phase, event.phase)
    done, total = event.done, event.total
    if event.total:
        text = f"{event.activity or text}: {done}/{total} replies"
    elif event.phase == "training" and event.total_steps:
        text, done, total = f"Training: step {event.step}/{event.total_steps}", event.step, event.total_steps
    return {"name": event.phase, "text": text, "done": done, "total": total}


class ProgressRecorder:
    """Receives the trainer's ProgressEvents and writes them to the run row, at most ~2 per second.

    Log lines are appended to what the row holds at write time, so lines written by
    others meanwhile (a cancel request) are kept.
    """

    MIN_INTERVAL = 0.5

    def __init__(self, run: TrainingRun, echo: Callable[[Any], None] | None = None):
        self.run_id = run.pk
        self.echo = echo
        self.pending: list[str] = []
        self.loss_history: list[dict[str, float]] = []
        self.state: dict[str, Any] = {}
        self.last_write = 0.0
        self.phase = ""

    def note(self, line: str) -> None:
        self.pending.append(_stamp(line))
        self.flush()

    def __call__(self, event) -> None:
        if self.echo is not None:
            self.echo(event)
        self.state["progress"] = event.progress
        self.state["phase"] = phase_of(event)
        if event.total_steps:
            # Evaluation and saving events carry no steps: the counter keeps the training's.
            self.state.update(current_step=event.step, total_steps=event.total_steps, current_epoch=event.epoch)
        important = event.phase != self.phase or event.phase == "done"
        self.phase = event.phase
        if event.loss is not None:
            self.loss_history.append({"step": event.step, "epoch": event.epoch, "loss": round(event.loss, 5)})
        if event.message:
            self.pending.append(_stamp(event.message))
        # Each write is a committed transaction (an fsync on SQLite): a tiny model's
        # 10 ms steps must not each wait for one.
        if important or time.monotonic() - self.last_write >= self.MIN_INTERVAL:
            self.flush()

    def flush(self) -> None:
        self.last_write = time.monotonic()
        with transaction.atomic():
            run = TrainingRun.objects.select_for_update().filter(pk=self.run_id, status="running").first()
            if run is None:
                return  # finished meanwhile (cancelled, reaped): its row is final
            for name, value in self.state.items():
                setattr(run, name, value)
            run.loss_history = self.loss_history
            run_log_append(run, *self.pending, stamped=True)
            run.heartbeat_at = timezone.now()
            run.save(update_fields=[*self.state, "loss_history", "log_tail", "heartbeat_at"])
        self.pending = []
