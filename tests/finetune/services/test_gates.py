"""Promotion gates: a worse candidate stays a candidate, a person may override with a reason, apps add gates."""

from __future__ import annotations

import pytest

from finetune.models import ModelVersion, ModelVersionEvent, TrainingRun
from finetune.services import gates
from finetune.services.gates import GateResult
from finetune.services.model_versions import model_version_promote, model_version_rollback
from finetune.services.training_runs import training_run_execute, training_run_request
from supportbot.errors import ApplicationError
from tests.factories import UserFactory
from tests.finetune.fixtures import FAST, ModelEvents, dataset_version_create

pytestmark = pytest.mark.django_db


def test_worse_candidate_fails_the_gate_and_needs_a_reason(
    transactional_db, model_store, dataset_dir, fast_heartbeat, quality_gate_advisory
):
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


def test_a_registered_gate_blocks_automatic_promotion(
    transactional_db, model_store, dataset_dir, fast_heartbeat, monkeypatch, quality_gate_advisory
):
    monkeypatch.setattr(gates, "_PROMOTION_GATES", dict(gates._PROMOTION_GATES))

    @gates.promotion_gate_register("fairness")
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
