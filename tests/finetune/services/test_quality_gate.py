"""The reply-quality gate: a candidate worse than the nearest old ticket is not served, and the admin says why."""

from __future__ import annotations

import pytest
from django.urls import reverse

from finetune.models import ModelVersion, ModelVersionEvent
from finetune.services.gates import model_version_gates_evaluate
from finetune.services.model_versions import model_version_promote
from supportbot.errors import ApplicationError
from supportbot.roles import MODEL_ADMINS, roles_sync
from tests.factories import UserFactory
from tests.finetune.fixtures import version_with_files

pytestmark = pytest.mark.django_db


def row(name, rouge, intent, *, slots=0, repeats=0, n=20, label=None, model=12, retrieved=8):
    examples = [
        {
            "question": f"where is my order {i}",
            "reference": f"Your order {i} ships tomorrow.",
            "reply": f"{name} reply {i}",
            "source": "retrieved" if name.startswith("retrieval") else "model",
            "origin": f"ticket:bitext:{i}" if name.startswith("retrieval") else "",
        }
        for i in range(3)
    ]
    return {
        "name": name,
        "label": label or name,
        "n": n,
        "rouge_l": rouge,
        "intent_accuracy": intent,
        "slot_leaks": slots,
        "repeats": repeats,
        "model_replies": model,
        "retrieved": retrieved,
        "handoffs": n - model - retrieved,
        "cut": 0,
        "examples": examples,
    }


def version(tmp_path, candidate, *, retrieval=None, active_row=None, active_id=None, **kwargs):
    rows = {"candidate": candidate, "retrieval": retrieval or row("retrieval", 0.35, 0.90, label="Retrieval")}
    if active_row:
        rows["active"] = active_row
    quality = {"rows": rows, "grounded": True, "examples": candidate["n"]}
    if active_id:
        quality["active_version_id"] = active_id
    return version_with_files(tmp_path, metrics={"eval_loss": 1.0, "quality": quality}, **kwargs)


def reply_gate(candidate_version, active=None):
    return model_version_gates_evaluate(version=candidate_version, active=active, save=False)["gates"]["reply_quality"]


def test_a_candidate_below_the_retrieval_baseline_is_refused(tmp_path):
    below = version(tmp_path, row("candidate", 0.229, 0.97))

    gate = reply_gate(below)

    assert gate["passed"] is False
    assert "ROUGE-L 0.229 does not beat the retrieval baseline's 0.350" in gate["detail"]
    assert "on 20 validation replies" in gate["detail"]
    assert gate["values"]["retrieval"]["rouge_l"] == 0.35
    with pytest.raises(ApplicationError, match="reply_quality: ROUGE-L 0.229 does not beat"):
        model_version_promote(version=below, automatic=True)
    below.refresh_from_db()
    assert below.status == ModelVersion.Status.CANDIDATE


def test_intent_accuracy_must_beat_retrieval_or_reach_the_target(tmp_path, settings):
    settings.SUPPORTBOT_GATE_INTENT_ACCURACY = 0.95
    worse = version(tmp_path, row("candidate", 0.40, 0.85))
    target = version(tmp_path, row("candidate", 0.40, 0.96), retrieval=row("retrieval", 0.35, 0.98))
    better = version(tmp_path, row("candidate", 0.40, 0.93))

    assert (
        "Intent accuracy 0.850 neither beats the retrieval baseline's 0.900 nor reaches 0.95"
        in (reply_gate(worse)["detail"])
    )
    assert reply_gate(target)["passed"] is True
    assert reply_gate(better)["passed"] is True
    assert "ROUGE-L 0.400 vs 0.350, intent accuracy 0.930 vs 0.900" in reply_gate(better)["detail"]


def test_a_slot_or_a_repeat_fails_the_gate(tmp_path):
    slots = version(tmp_path, row("candidate", 0.5, 0.99, slots=1))
    loops = version(tmp_path, row("candidate", 0.5, 0.99, repeats=2))

    assert reply_gate(slots)["passed"] is False
    assert "1 of 20 replies show a template slot" in reply_gate(slots)["detail"]
    assert "2 of 20 replies repeat themselves" in reply_gate(loops)["detail"]


def test_the_candidate_may_fall_below_the_active_version_only_within_the_margin(tmp_path, settings):
    settings.SUPPORTBOT_GATE_QUALITY_MARGIN = 0.02
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE, metrics={"eval_loss": 1.0})
    close = version(tmp_path, row("candidate", 0.40, 0.95), active_row=row("active", 0.41, 0.96), active_id=active.pk)
    far = version(tmp_path, row("candidate", 0.40, 0.95), active_row=row("active", 0.45, 0.96), active_id=active.pk)
    stale = version(tmp_path, row("candidate", 0.40, 0.95), active_row=row("active", 0.30, 0.9), active_id=-1)
    unscored = version(tmp_path, row("candidate", 0.40, 0.95))

    assert reply_gate(close, active)["passed"] is True
    assert f"within 0.02 of {active.label}" in reply_gate(close, active)["detail"]
    assert (
        f"ROUGE-L 0.400 is below {active.label}'s 0.450 by more than the margin 0.02"
        in (reply_gate(far, active)["detail"])
    )
    assert "were not scored on this validation sample" in reply_gate(stale, active)["detail"]
    assert reply_gate(unscored, active)["passed"] is False


def test_a_version_without_a_quality_evaluation_is_not_promoted_automatically(tmp_path):
    old = version_with_files(tmp_path, metrics={"eval_loss": 1.0})
    gate = reply_gate(old)
    assert gate["passed"] is False
    assert "were not scored against the retrieval baseline" in gate["detail"]


def test_advisory_gates_are_shown_but_do_not_block(tmp_path, settings, monkeypatch):
    from finetune.services import gates

    monkeypatch.setattr(gates, "_PROMOTION_GATES", {"reply_quality": gates._PROMOTION_GATES["reply_quality"]})
    below = version(tmp_path, row("candidate", 0.1, 0.5))
    assert model_version_gates_evaluate(version=below, save=False)["passed"] is False
    settings.SUPPORTBOT_GATES_ADVISORY = ["reply_quality"]
    summary = model_version_gates_evaluate(version=below, save=False)
    assert summary["gates"]["reply_quality"]["passed"] is False
    assert summary["gates"]["reply_quality"]["advisory"] is True
    assert summary["passed"] is True
    assert gates.gate_failures_text(summary) == "no gate failed"


def test_the_admin_shows_the_three_side_by_side_and_why_then_promotes_by_hand(client, tmp_path):
    user = UserFactory(username="quality-admin", is_staff=True)
    roles_sync()
    from django.contrib.auth.models import Group

    user.groups.add(Group.objects.get(name=MODEL_ADMINS))
    client.force_login(user)
    active = version_with_files(tmp_path, status=ModelVersion.Status.ACTIVE, metrics={"eval_loss": 1.0})
    active.promoted_at = active.created_at
    active.save()
    candidate = version(
        tmp_path,
        row("candidate", 0.229, 0.50, model=20, retrieved=0),
        retrieval=row("retrieval", 0.459, 0.90, label="Retrieval: the nearest past answer"),
        active_row=row("active", 0.30, 0.80, label=f"{active.label} (active)"),
        active_id=active.pk,
    )
    model_version_gates_evaluate(version=candidate, active=active)

    page = client.get(reverse("admin:finetune_modelversion_change", args=[candidate.pk])).content.decode()

    assert 'id="quality-comparison"' in page
    assert f"{candidate.label} (candidate)" in page
    assert f"{active.label} (active)" in page
    assert "Retrieval: the nearest past answer" in page
    for value in ("0.229", "0.459", "0.300", "0.500", "0.900", "0.800"):
        assert value in page
    assert 'id="reply-quality-verdict"' in page
    assert "Reply quality gate failed" in page
    assert "ROUGE-L 0.229 does not beat the retrieval baseline&#x27;s 0.459" in page
    assert "intent accuracy 0.500 neither beats" in page
    assert 'id="quality-examples"' in page
    assert "candidate reply 0" in page
    assert "retrieval reply 0" in page
    assert "ticket:bitext:0" in page  # a past answer shows where it came from

    promote = reverse("admin:finetune_modelversion_promote", args=[candidate.pk])
    assert "Reply quality gate failed" in client.get(promote).content.decode()
    refused = client.post(promote, {"reason": ""})
    assert b"give a reason" in refused.content
    done = client.post(promote, {"reason": "Launch needs the new intents; retrieval misses them"})
    assert done.status_code == 302
    candidate.refresh_from_db()
    assert candidate.status == ModelVersion.Status.ACTIVE
    event = candidate.events.get(action=ModelVersionEvent.Action.PROMOTED)
    assert (event.actor, event.gates_overridden) == (user, True)
    assert event.reason == "Launch needs the new intents; retrieval misses them"
    assert event.gate_results["gates"]["reply_quality"]["passed"] is False


@pytest.mark.slow
def test_runs_score_the_served_path_against_retrieval_and_the_active_version(
    transactional_db, model_store, settings, tmp_path, ticket_lm_dir, fast_heartbeat
):
    """Two real runs on a grounded dataset: the second is compared with the first on the same validation replies."""
    from finetune.ml.dataset_builder import BuildOptions, build_dataset, conversations_from_jsonl
    from finetune.ml.knowledge import load_knowledge
    from finetune.ml.training import load_tokenizer
    from finetune.services.training_runs import training_run_execute, training_run_request
    from tests.finetune.fixtures import SAMPLE_TICKETS, dataset_version_create

    settings.SUPPORTBOT_BASE_MODEL = str(ticket_lm_dir)
    out = tmp_path / "grounded"
    options = BuildOptions(out_dir=out, tokenizer_name=str(ticket_lm_dir), max_length=512)
    build_dataset(conversations_from_jsonl(SAMPLE_TICKETS), load_tokenizer(str(ticket_lm_dir)), options)
    dataset_version_create(out)
    quick = {
        "epochs": 1,
        "learning_rate": 1e-3,
        "max_examples": 12,
        "batch_size": 4,
        "grad_accum_steps": 1,
        "max_eval_examples": 8,
        "eval_generate_samples": 4,
        "eval_max_new_tokens": 12,
    }

    first = training_run_execute(run_id=training_run_request(hyperparameters=quick, enqueue=False).pk)
    v1 = ModelVersion.objects.get(training_run=first)
    rows = v1.metrics["quality"]["rows"]
    assert set(rows) == {"base", "candidate", "retrieval", "retrieval-consensus"}
    gate = v1.gate_results["gates"]["reply_quality"]
    # The verdict is the stored rows' comparison, whatever this tiny model managed.
    beats = rows["candidate"]["rouge_l"] > rows["retrieval"]["rouge_l"]
    assert gate["values"]["candidate"]["rouge_l"] == rows["candidate"]["rouge_l"]
    if not beats:
        assert gate["passed"] is False
        assert "does not beat the retrieval baseline" in gate["detail"]
        assert "reply_quality" in first.log_tail
    if v1.status != ModelVersion.Status.ACTIVE:
        model_version_promote(version=v1, actor=UserFactory(), reason="the first version of the test")
    knowledge = load_knowledge(v1.merged_path, strict=True)
    assert knowledge.grounded
    assert knowledge.classifier is not None

    second = training_run_execute(run_id=training_run_request(hyperparameters=quick, enqueue=False).pk)
    v2 = ModelVersion.objects.get(training_run=second)
    quality = v2.metrics["quality"]
    assert quality["active_version_id"] == v1.pk
    active_row = quality["rows"]["active"]
    assert active_row["label"] == f"{v1.label} (active)"
    assert active_row["n"] == quality["rows"]["candidate"]["n"] == 4
    gate = v2.gate_results["gates"]["reply_quality"]
    assert gate["values"]["retrieval"]["rouge_l"] == quality["rows"]["retrieval"]["rouge_l"]
    if gate["passed"]:
        assert gate["values"]["active"]["rouge_l"] == active_row["rouge_l"]
    # The retrieval rows are cached with the dataset, the active version's row with that version.
    assert list(out.glob("quality-*.json"))
    assert list(load_knowledge(v1.merged_path).root.glob("quality-*-active.json"))
