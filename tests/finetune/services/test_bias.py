"""Counterfactual bias probes of a model version: the BiasReport, the promotion gate, the command, the run hook."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from finetune.models import BiasReport, ModelVersion
from finetune.services import bias
from finetune.services.gates import model_version_gates_evaluate
from finetune.services.model_versions import model_version_promote
from supportbot.errors import ApplicationError
from tests.factories import ModelVersionFactory
from tests.finetune.ml.test_probes import biased_generator, even_generator, intent_of

pytestmark = [pytest.mark.django_db, pytest.mark.bias_gate]  # the bias_probe gate blocks here


def test_the_probe_flags_a_biased_generator_and_records_why(settings):
    settings.SUPPORTBOT_BIAS_PROBE_REQUESTS = 54  # the whole probe set
    version = ModelVersionFactory(number=4)
    report = bias.bias_probe_run(version=version, generate=biased_generator, intent_of=intent_of)
    assert report.status == BiasReport.Status.FAIL
    flagged = {line.split(":")[0] for line in report.failures}
    assert any("colloquial" in line for line in flagged)
    assert any("typos" in line for line in flagged)
    assert not any("polite" in line or "upper" in line for line in flagged)
    assert report.settings["requests"] == 54
    assert report.report["status"] == "fail"
    worst = {w["measure"]: w for w in report.report["worst"]}
    assert worst["length_words"]["group"] in {"colloquial", "typos"}
    assert worst["length_words"]["examples"][0]["reply"] == "Check the website."  # an example reply is kept


def test_the_probe_passes_an_even_generator():
    report = bias.bias_probe_run(version=ModelVersionFactory(), generate=even_generator, intent_of=intent_of)
    assert report.status == BiasReport.Status.PASS
    assert report.failures == []


def test_a_probe_that_cannot_run_is_recorded_not_raised(tmp_path):
    version = ModelVersionFactory(adapter_path=str(tmp_path / "gone"), merged_path="")
    report = bias.bias_probe_run(version=version, intent_of=intent_of)
    assert report.status == BiasReport.Status.ERROR
    assert "files of" in report.error


def test_too_few_requests_is_insufficient():
    report = bias.bias_probe_run(
        version=ModelVersionFactory(), generate=even_generator, intent_of=intent_of, requests=5
    )
    assert report.status == BiasReport.Status.INSUFFICIENT


def test_the_gate_blocks_a_candidate_that_failed_and_passes_one_that_passed():
    failing, passing = ModelVersionFactory(number=5), ModelVersionFactory(number=6)
    bias.bias_probe_run(version=failing, generate=biased_generator, intent_of=intent_of)
    bias.bias_probe_run(version=passing, generate=even_generator, intent_of=intent_of)
    unprobed = ModelVersionFactory(number=7)
    assert model_version_gates_evaluate(version=failing)["gates"]["bias_probe"]["passed"] is False
    assert "colloquial" in failing.gate_results["gates"]["bias_probe"]["detail"]
    assert model_version_gates_evaluate(version=passing)["gates"]["bias_probe"]["passed"] is True
    detail = model_version_gates_evaluate(version=unprobed)["gates"]["bias_probe"]["detail"]
    assert "manage.py bias_probe --version 7" in detail
    running = ModelVersionFactory(number=10)
    bias.bias_report_start(version=running, trigger="training_run")
    assert "is running" in model_version_gates_evaluate(version=running)["gates"]["bias_probe"]["detail"]
    # The latest report counts: probing again with an even generator clears the gate.
    bias.bias_probe_run(version=failing, generate=even_generator, intent_of=intent_of)
    assert model_version_gates_evaluate(version=failing)["gates"]["bias_probe"]["passed"] is True


def test_automatic_promotion_of_a_failing_candidate_is_refused(tmp_path):
    candidate = ModelVersionFactory(number=8, metrics={"eval_loss": 1.0}, adapter_path=str(tmp_path))
    bias.bias_probe_run(version=candidate, generate=biased_generator, intent_of=intent_of)
    with pytest.raises(ApplicationError, match="bias_probe"):
        model_version_promote(version=candidate, automatic=True)
    candidate.refresh_from_db()
    assert candidate.status == ModelVersion.Status.CANDIDATE


def test_the_command_probes_a_version_and_exits_non_zero_when_it_fails(monkeypatch, capsys):
    ModelVersionFactory(number=9)
    monkeypatch.setattr(bias, "version_generator", lambda version, max_new_tokens: biased_generator)
    monkeypatch.setattr(bias, "intent_classifier_for", lambda version: (intent_of, "test classifier"))
    with pytest.raises(CommandError, match="did not pass"):
        call_command("bias_probe", "--version", "v9")
    out = capsys.readouterr().out
    assert "v9: Fail" in out
    assert "flagged:" in out
    monkeypatch.setattr(bias, "version_generator", lambda version, max_new_tokens: even_generator)
    call_command("bias_probe", "--version", "9", "--gates")
    assert "v9: Pass" in capsys.readouterr().out
    assert BiasReport.objects.filter(version__number=9).count() == 2
    with pytest.raises(CommandError, match="no version v99"):
        call_command("bias_probe", "--version", "99")


def test_a_training_run_probes_its_candidate_and_a_failing_one_stays_a_candidate(
    transactional_db, model_store, dataset_dir, fast_heartbeat, monkeypatch
):
    from finetune.models import TrainingRun
    from finetune.services.training_runs import training_run_execute, training_run_request
    from tests.finetune.fixtures import FAST, dataset_version_create

    monkeypatch.setattr(bias, "version_generator", lambda version, max_new_tokens: biased_generator)
    monkeypatch.setattr(bias, "intent_classifier_for", lambda version: (intent_of, "test classifier"))
    dataset_version_create(dataset_dir)
    run = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    version = ModelVersion.objects.get(training_run=run)
    assert version.status == ModelVersion.Status.CANDIDATE  # the first version, yet not promoted
    assert version.bias_reports.get().status == BiasReport.Status.FAIL  # the running report, finished
    assert version.gate_results["gates"]["validation_loss"]["passed"] is True
    assert version.gate_results["gates"]["bias_probe"]["passed"] is False
    assert "Bias probe of v1: fail" in run.log_tail
    assert "stays a candidate: failed gates: bias_probe" in run.log_tail


def test_a_probe_that_breaks_does_not_fail_the_training_run(
    transactional_db, model_store, dataset_dir, fast_heartbeat, monkeypatch
):
    from finetune.models import TrainingRun
    from finetune.services.training_runs import training_run_execute, training_run_request
    from tests.finetune.fixtures import FAST, dataset_version_create

    def broken(version, max_new_tokens):
        raise MemoryError("CUDA out of memory")

    monkeypatch.setattr(bias, "version_generator", broken)
    dataset_version_create(dataset_dir)
    run = training_run_execute(run_id=training_run_request(hyperparameters=FAST, enqueue=False).pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    version = ModelVersion.objects.get(training_run=run)
    report = version.bias_reports.get()
    assert report.status == BiasReport.Status.ERROR
    assert "MemoryError: CUDA out of memory" in report.error
    assert version.status == ModelVersion.Status.CANDIDATE
    assert "could not run" in version.gate_results["gates"]["bias_probe"]["detail"]


def test_the_version_page_shows_the_bias_report(admin_client):
    version = ModelVersionFactory(number=11)
    bias.bias_probe_run(version=version, generate=biased_generator, intent_of=intent_of)
    html = admin_client.get(f"/admin/finetune/modelversion/{version.pk}/change/").content.decode()
    assert 'id="bias-report"' in html
    assert "Fail" in html
    assert 'id="bias-table"' in html
    assert "colloquial" in html
    assert "Check the website." in html  # an example reply of the worst group
    unprobed = ModelVersionFactory(number=12)
    html = admin_client.get(f"/admin/finetune/modelversion/{unprobed.pk}/change/").content.decode()
    assert "manage.py bias_probe --version 12" in html
