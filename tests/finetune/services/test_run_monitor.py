"""A run's record while it runs: the log tail and its limit, final statuses, progress writes."""

from __future__ import annotations

import pytest

from finetune.ml.training import ProgressEvent
from finetune.models import TrainingRun
from finetune.services.run_monitor import (
    LOG_TAIL_LINES,
    ProgressRecorder,
    run_log_append,
    training_run_finish_if_running,
    training_run_note,
)
from finetune.services.training_runs import training_run_cancel
from tests.factories import TrainingRunFactory

pytestmark = pytest.mark.django_db


def full_log() -> str:
    return "\n".join(f"00:00:00 line {i}" for i in range(LOG_TAIL_LINES))


def test_log_lines_are_time_stamped_and_only_the_newest_are_kept():
    run = TrainingRun(log_tail=full_log())
    run_log_append(run, "Started", "Step 1")
    lines = run.log_tail.splitlines()
    assert len(lines) == LOG_TAIL_LINES
    assert lines[0] == "00:00:00 line 2"
    assert lines[-2].endswith(" Started")
    assert lines[-1].endswith(" Step 1")
    assert lines[-1][:8].count(":") == 2  # HH:MM:SS
    run_log_append(run, "12:00:00 already stamped", stamped=True)
    assert run.log_tail.splitlines()[-1] == "12:00:00 already stamped"


def test_every_writer_keeps_the_log_within_its_limit():
    """Cancelling, noting and finishing all append through run_log_append (cancel used to skip the trim)."""
    queued = TrainingRunFactory(status=TrainingRun.Status.QUEUED, log_tail=full_log())
    training_run_cancel(run=queued)
    running = TrainingRunFactory(status=TrainingRun.Status.RUNNING, log_tail=full_log(), lane="other")
    training_run_cancel(run=running)
    training_run_note(run_id=running.pk, line="A note after the fact")
    for run in (queued, running):
        run.refresh_from_db()
        assert len(run.log_tail.splitlines()) == LOG_TAIL_LINES
    assert queued.log_tail.endswith("Cancelled by the system before it started")
    assert running.log_tail.endswith("A note after the fact")


def test_finishing_only_ends_a_run_that_is_still_running():
    running = TrainingRunFactory(status=TrainingRun.Status.RUNNING)
    assert training_run_finish_if_running(running.pk, TrainingRun.Status.FAILED, "Out of memory.", line="Failed")
    running.refresh_from_db()
    assert (running.status, running.error) == (TrainingRun.Status.FAILED, "Out of memory.")
    assert running.finished_at is not None
    assert running.log_tail.endswith(" Failed")
    # The reaper or a time limit got there first: the final status stays as it was.
    assert not training_run_finish_if_running(running.pk, TrainingRun.Status.CANCELLED)
    running.refresh_from_db()
    assert running.status == TrainingRun.Status.FAILED


def test_progress_is_written_at_phase_changes_and_never_onto_a_finished_run():
    run = TrainingRunFactory(status=TrainingRun.Status.RUNNING, log_tail="")
    seen = []
    recorder = ProgressRecorder(run, echo=seen.append)
    recorder(ProgressEvent(phase="training", progress=0.5, step=5, total_steps=10, epoch=0.5, loss=2.5, message="hi"))
    run.refresh_from_db()
    assert (run.progress, run.current_step, run.total_steps) == (0.5, 5, 10)
    assert run.loss_history == [{"step": 5, "epoch": 0.5, "loss": 2.5}]
    assert run.log_tail.endswith(" hi")
    assert run.heartbeat_at is not None
    assert len(seen) == 1  # the caller's hook sees every event

    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.CANCELLED)
    recorder(ProgressEvent(phase="done", progress=1.0, step=10, total_steps=10, epoch=1.0))
    run.refresh_from_db()
    assert (run.status, run.progress) == (TrainingRun.Status.CANCELLED, 0.5)  # its row is final


def test_the_run_row_says_the_phase_with_its_own_progress_and_keeps_the_step_counter():
    run = TrainingRunFactory(status=TrainingRun.Status.RUNNING)
    recorder = ProgressRecorder(run)
    recorder(ProgressEvent(phase="training", progress=0.5, step=40, total_steps=40, epoch=2.0))
    evaluating = ProgressEvent(
        phase="evaluating_after", progress=0.9, done=12, total=32, activity="Evaluating the fine-tuned model"
    )
    recorder(evaluating)
    recorder.flush()
    run.refresh_from_db()
    assert run.phase == {
        "name": "evaluating_after",
        "text": "Evaluating the fine-tuned model: 12/32 replies",
        "done": 12,
        "total": 32,
    }
    assert (run.current_step, run.total_steps, run.current_epoch) == (40, 40, 2.0)  # not "step 0/0"
