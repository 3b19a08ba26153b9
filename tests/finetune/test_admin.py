"""The fine-tuning admin (datasets, retraining, model versions): test client, a real worker, a browser."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from finetune.models import BiasReport, ModelVersion, ModelVersionEvent, TrainingRun
from finetune.services.datasets import dataset_version_build
from finetune.services.tickets import ticket_import
from finetune.services.training_runs import training_run_request
from supportbot.roles import MODEL_ADMINS, SUPPORT_AGENTS, roles_sync
from tests.factories import TrainingRunFactory, UserFactory
from tests.finetune.fixtures import FAST, dataset_version_create, version_with_files, wait_for

pytestmark = pytest.mark.django_db

RETRAIN = reverse("admin:finetune_trainingrun_retrain")
RUNS = reverse("admin:finetune_trainingrun_changelist")
VERSIONS = reverse("admin:finetune_modelversion_changelist")


def staff(role: str, username: str):
    roles_sync()
    user = UserFactory(username=username, is_staff=True)
    user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def model_admin(client):
    user = staff(MODEL_ADMINS, "modeladmin")
    client.force_login(user)
    return user


def test_retrain_button_form_and_refusal_of_a_second_run(client, model_admin, model_store, dataset_dir):
    dataset = dataset_version_create(dataset_dir, name="tickets-june")
    listing = client.get(RUNS)
    assert listing.status_code == 200
    assert b'id="retrain-now"' in listing.content

    form = client.get(RETRAIN)
    assert form.status_code == 200
    assert b"Newest dataset (tickets-june)" in form.content

    response = client.post(
        RETRAIN,
        {"dataset": str(dataset.pk), "epochs": "1.5", "learning_rate": "0.0003", "lora_r": "8", "auto_promote": "on"},
    )
    run = TrainingRun.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("admin:finetune_trainingrun_change", args=[run.pk])
    assert run.status == TrainingRun.Status.QUEUED
    assert run.requested_by == model_admin
    assert run.dataset_version == dataset
    assert (run.hyperparameters["epochs"], run.hyperparameters["lora_r"]) == (1.5, 8)
    assert run.hyperparameters["learning_rate"] == pytest.approx(3e-4)
    assert run.hyperparameters["auto_promote"] is True

    again = client.post(RETRAIN, {"dataset": "latest", "epochs": "1", "learning_rate": "0.0002", "lora_r": "16"})
    assert again.status_code == 200
    assert f"Run #{run.pk} is already queued; only one training run at a time".encode() in again.content
    assert TrainingRun.objects.count() == 1

    bad = client.post(RETRAIN, {"dataset": "latest", "epochs": "1", "learning_rate": "5", "lora_r": "16"})
    assert b"learning_rate=5.0 is outside" in bad.content


def test_admin_lists_dataset_versions(dataset_settings, sample_tickets, admin_client):
    ticket_import(path=sample_tickets, fmt="jsonl", source="sample")
    version = dataset_version_build(max_examples=30)
    response = admin_client.get("/admin/finetune/datasetversion/")
    assert response.status_code == 200
    assert version.name in response.content.decode()
    detail = admin_client.get(f"/admin/finetune/datasetversion/{version.pk}/change/")
    assert detail.status_code == 200
    assert version.content_hash in detail.content.decode()


def test_support_agents_cannot_retrain_or_promote(client, tmp_path):
    client.force_login(staff(SUPPORT_AGENTS, "agent"))
    version = version_with_files(tmp_path)
    assert client.get(RETRAIN).status_code == 403
    assert client.post(reverse("admin:finetune_modelversion_promote", args=[version.pk])).status_code == 403
    assert client.post(reverse("admin:finetune_modelversion_rollback")).status_code == 403
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.CANDIDATE


def test_run_page_shows_progress_loss_curve_and_cancels(client, model_admin):
    run = TrainingRunFactory(
        status=TrainingRun.Status.RUNNING,
        progress=0.42,
        current_step=21,
        total_steps=50,
        loss_history=[{"step": s, "epoch": s / 25, "loss": 3.0 - s / 20} for s in range(1, 22)],
        log_tail="12:00:00 step 21/50",
    )
    page = client.get(reverse("admin:finetune_trainingrun_change", args=[run.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="run-progress"' in html
    assert "width: 42%" in html
    assert "<polyline" in html  # the server-rendered loss curve
    assert "finetune/run_progress.js" in html
    assert 'id="cancel-run"' in html

    data = client.get(reverse("admin:finetune_trainingrun_progress", args=[run.pk])).json()
    assert data["status"] == "running"
    assert data["is_live"] is True
    assert data["current_step"] == 21
    assert data["loss_points"] == 21
    assert data["last_loss"] == pytest.approx(1.95)
    assert data["loss_svg"].startswith("<svg")

    response = client.post(reverse("admin:finetune_trainingrun_cancel", args=[run.pk]), follow=True)
    assert b"stops at its next training step" in response.content
    run.refresh_from_db()
    assert run.cancel_requested


def test_promote_over_a_failed_gate_needs_a_reason_then_roll_back(client, model_admin, tmp_path):
    v1 = version_with_files(tmp_path, metrics={"eval_loss": 1.2, "validation_fingerprint": "set-a", "rouge_l": 0.3})
    v1.status = ModelVersion.Status.ACTIVE
    v1.promoted_at = v1.created_at
    v1.save()
    v2 = version_with_files(tmp_path, metrics={"eval_loss": 1.5, "validation_fingerprint": "set-a", "rouge_l": 0.4})
    promote_url = reverse("admin:finetune_modelversion_promote", args=[v2.pk])

    detail = client.get(reverse("admin:finetune_modelversion_change", args=[v2.pk])).content.decode()
    assert 'id="promote"' in detail
    assert 'id="metrics-comparison"' in detail
    page = client.get(promote_url).content.decode()
    assert "validation_loss</strong>: failed" in page
    assert "Active: v" in page
    assert "1.5000" in page
    assert "1.2000" in page

    refused = client.post(promote_url, {"reason": ""})
    assert refused.status_code == 200
    assert b"give a reason" in refused.content
    v2.refresh_from_db()
    assert v2.status == ModelVersion.Status.CANDIDATE

    done = client.post(promote_url, {"reason": "Better answers for typo-laden questions"})
    assert done.status_code == 302
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v1.status, v2.status) == ("retired", "active")
    event = v2.events.get(action=ModelVersionEvent.Action.PROMOTED)
    assert (event.actor, event.gates_overridden) == (model_admin, True)
    assert event.reason == "Better answers for typo-laden questions"

    listing = client.get(VERSIONS).content.decode()
    assert f"Roll back from {v2.label}" in listing
    back = client.post(reverse("admin:finetune_modelversion_rollback"), follow=True)
    assert f"Rolled back: {v1.label} is active again." in back.content.decode()
    v1.refresh_from_db()
    assert v1.status == ModelVersion.Status.ACTIVE

    # Any version that served can be restored in one click.
    restore = client.post(reverse("admin:finetune_modelversion_restore", args=[v2.pk]), follow=True)
    assert f"Restored {v2.label}: it is the active version again." in restore.content.decode()
    v2.refresh_from_db()
    assert v2.status == ModelVersion.Status.ACTIVE


@pytest.mark.slow
def test_admin_flow_with_a_real_worker(client, model_store, dataset_dir, model_gates_advisory, training_worker):
    """Retrain from the admin, follow the run to its end through the progress endpoint, promote the result."""
    user = staff(MODEL_ADMINS, "flowadmin")
    client.force_login(user)
    training_worker()
    dataset_version_create(dataset_dir)
    # The form's settings, everything else at its default: a few steps of the tiny model.
    form = {"dataset": "latest", "epochs": "2", "learning_rate": "0.01", "lora_r": "8", "max_examples": "4"}
    first = client.post(RETRAIN, form)
    run = TrainingRun.objects.get()
    assert first.url == reverse("admin:finetune_trainingrun_change", args=[run.pk])
    progress = reverse("admin:finetune_trainingrun_progress", args=[run.pk])
    data = wait_for(lambda: (d := client.get(progress).json())["is_live"] is False and d, timeout=600)
    assert data["status"] == "succeeded", data["error"]
    assert data["settled"] is True  # nothing follows: auto-promotion was not asked for
    assert (data["phase"]["text"], data["title"]) == ("", f"Run #{run.pk} (Succeeded)")
    assert data["progress"] == 1.0
    assert data["current_step"] == data["total_steps"] > 0
    version = ModelVersion.objects.get(training_run=run)
    assert data["version"] == {
        "label": version.label,
        "status": "Candidate",  # auto-promotion was left unticked
        "url": reverse("admin:finetune_modelversion_change", args=[version.pk]),
    }
    page = client.get(reverse("admin:finetune_trainingrun_change", args=[run.pk])).content.decode()
    assert "<polyline" in page
    run.refresh_from_db()
    assert run.base_model
    assert run.base_model in page  # the resolved base is shown

    # The run probes its candidate for bias after it succeeded; the gate waits for that.
    wait_for(lambda: not version.bias_reports.filter(status=BiasReport.Status.RUNNING).exists(), timeout=90)
    promote = reverse("admin:finetune_modelversion_promote", args=[version.pk])
    assert "validation_loss</strong>: passed" in client.get(promote).content.decode()
    client.post(promote, {"reason": ""})
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.ACTIVE
    assert version.promoted_by == user


def browser_login(chromium, live_server, user, password: str, next_url: str) -> None:
    from selenium.webdriver.common.by import By

    chromium.get(f"{live_server.url}/admin/login/?next={next_url}")
    chromium.find_element(By.NAME, "username").send_keys(user.username)
    chromium.find_element(By.NAME, "password").send_keys(password)
    chromium.find_element(By.CSS_SELECTOR, "input[type=submit]").click()


@pytest.mark.slow
@pytest.mark.browser
def test_progress_page_updates_live_in_a_browser(
    chromium, live_server, model_store, dataset_dir, model_gates_advisory, training_worker, settings
):
    from selenium.webdriver.common.by import By

    user = staff(MODEL_ADMINS, "browseradmin")
    user.set_password("correct-horse-battery")
    user.save()
    dataset_version_create(dataset_dir)
    queue = "test-browser-" + user.username
    settings.SUPPORTBOT_TRAINING_QUEUE = queue
    run = training_run_request(actor=user, hyperparameters=FAST)

    browser_login(chromium, live_server, user, "correct-horse-battery", f"/admin/finetune/trainingrun/{run.pk}/change/")
    # Conditions, each with a limit generous enough for a loaded machine (the run alone
    # took 49 s on an idle one): never a sleep, never a limit an idle machine needs.
    wait_for(
        lambda: chromium.find_elements(By.CSS_SELECTOR, '#run-progress [data-role="status"]'),
        timeout=120,
        message="the run page",
    )
    status = chromium.find_element(By.CSS_SELECTOR, '#run-progress [data-role="status"]')
    assert status.text == "Queued"
    assert chromium.find_element(By.CSS_SELECTOR, '#run-progress [data-role="percent"]').text == "0%"

    training_worker(queue=queue)  # the page is already open: only its script can show what happens next
    wait_for(lambda: status.text == "Succeeded", timeout=600, interval=1.0, message="the page to show the finished run")
    assert chromium.find_element(By.CSS_SELECTOR, '#run-progress [data-role="percent"]').text == "100%"
    assert chromium.find_elements(By.CSS_SELECTOR, "#run-progress svg polyline")
    # The automatic promotion follows the run's end (after the bias probe): the page polls until it is settled.
    wait_for(
        lambda: "is now active" in chromium.find_element(By.CSS_SELECTOR, '#run-progress [data-role="log"]').text,
        timeout=600,
        interval=1.0,
        message="the page to show the promotion",
    )
    assert "v1 (Active)" in chromium.find_element(By.CSS_SELECTOR, '#run-progress [data-role="version"]').text
    assert f"Run #{run.pk} (Succeeded)" in chromium.find_element(By.CSS_SELECTOR, ".breadcrumbs").text
    assert not chromium.find_elements(By.ID, "cancel-run")  # a finished run cannot be cancelled
    chromium.save_screenshot(str(model_store.parent / "progress.png"))


@pytest.mark.slow
@pytest.mark.browser
def test_run_page_shows_the_phase_follows_the_log_and_renames_the_run_when_it_ends(chromium, live_server):
    """The run's row changes as a worker would change it; the open page follows through its script."""
    from django.utils import timezone
    from selenium.webdriver.common.by import By

    user = staff(MODEL_ADMINS, "phaseadmin")
    user.set_password("correct-horse-battery")
    user.save()
    lines = [f"12:00:{i:02d} line {i}" for i in range(60)]
    run = TrainingRunFactory(
        status=TrainingRun.Status.RUNNING,
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
        progress=0.05,
        phase={
            "name": "evaluating_before",
            "text": "Evaluating the base model: 12/32 replies",
            "done": 12,
            "total": 32,
        },
        log_tail="\n".join(lines),
    )
    browser_login(chromium, live_server, user, "correct-horse-battery", f"/admin/finetune/trainingrun/{run.pk}/change/")
    panel = "#run-progress "
    wait_for(lambda: chromium.find_elements(By.CSS_SELECTOR, panel + '[data-role="phase"]'), timeout=120)

    def shown(role: str):
        element = chromium.find_element(By.CSS_SELECTOR, f'{panel}[data-role="{role}"]')
        return element if element.is_displayed() else None

    # During evaluation: the phase and its own progress, no "step 0/0 · epoch 0.00", no empty error box.
    assert shown("phase").text == "Evaluating the base model: 12/32 replies"
    assert shown("phase-bar-outer") is not None
    assert shown("steps") is None
    assert shown("error") is None
    log_at = "const log = document.querySelector('#run-progress [data-role=log]');"
    at_bottom = log_at + "return log.scrollTop + log.clientHeight >= log.scrollHeight - 4;"
    assert chromium.execute_script(log_at + "return log.scrollHeight > log.clientHeight;")  # it scrolls
    wait_for(lambda: chromium.execute_script(at_bottom), timeout=120, message="the log to show its tail")

    # The reader scrolls up: new lines do not pull the log down.
    chromium.execute_script(log_at + "log.scrollTop = 0; log.dispatchEvent(new Event('scroll'));")
    lines += [f"12:01:{i:02d} more {i}" for i in range(10)]
    TrainingRun.objects.filter(pk=run.pk).update(log_tail="\n".join(lines[-60:]))
    wait_for(lambda: "more 9" in chromium.execute_script(log_at + "return log.textContent;"), timeout=120)
    assert chromium.execute_script(log_at + "return log.scrollTop;") == 0

    # Back at the bottom, it follows again; training shows steps.
    chromium.execute_script(log_at + "log.scrollTop = log.scrollHeight; log.dispatchEvent(new Event('scroll'));")
    lines += [f"12:02:{i:02d} step line {i}" for i in range(10)]
    TrainingRun.objects.filter(pk=run.pk).update(
        log_tail="\n".join(lines[-60:]),
        current_step=3,
        total_steps=40,
        phase={"name": "training", "text": "Training: step 3/40", "done": 3, "total": 40},
    )
    wait_for(lambda: "step line 9" in chromium.execute_script(log_at + "return log.textContent;"), timeout=120)
    wait_for(lambda: chromium.execute_script(at_bottom), timeout=120, message="the log to follow its tail")
    assert shown("phase").text == "Training: step 3/40"
    assert "step 3/40" in shown("steps").text

    # The run ends: heading, breadcrumb and window title say so.
    TrainingRun.objects.filter(pk=run.pk).update(
        status=TrainingRun.Status.SUCCEEDED,
        finished_at=timezone.now(),
        progress=1.0,
        current_step=40,
        phase={"name": "done", "text": "Done", "done": 0, "total": 0},
    )
    breadcrumbs = chromium.find_element(By.CSS_SELECTOR, ".breadcrumbs")
    wait_for(lambda: f"Run #{run.pk} (Succeeded)" in breadcrumbs.text, timeout=120, message="the breadcrumb")
    assert "(Running)" not in breadcrumbs.text
    assert chromium.find_element(By.CSS_SELECTOR, "#content > h2").text == f"Run #{run.pk} (Succeeded)"
    assert chromium.title.startswith(f"Run #{run.pk} (Succeeded)")
    assert shown("status").text == "Succeeded"
    assert shown("phase") is None
    assert shown("error") is None
