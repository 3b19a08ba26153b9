"""Every admin page, opened as every role: nothing crashes, and each role sees exactly what README's roles table says.

For each model registered in the admin, the test opens its list, its add form, an
object's change (or view) page, its history and its delete confirmation, plus every
custom admin URL (retrain, progress, promote…), as a superuser, a model admin, a
support agent and a signed-in customer. The expected answer comes from the roles'
permissions (``supportbot.roles.ROLE_PERMISSIONS``, which README's table mirrors) and
from which models may be added or deleted in the admin at all (below): the rows of
conversations, messages, reviews, queue entries, training candidates, dataset
versions, model versions and their events are written by services only.
"""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.urls import reverse

from conversations.models import BotProfile, Conversation, Message, QueueItem, Review, TrainingCandidate
from finetune.models import DatasetVersion, ModelVersion, ModelVersionEvent, TrainingRun
from supportbot.roles import MODEL_ADMINS, ROLE_PERMISSIONS, SUPPORT_AGENTS
from tests.factories import (
    ConversationFactory,
    DatasetVersionFactory,
    ModelVersionFactory,
    QueueItemFactory,
    ReviewFactory,
    TicketFactory,
    TicketMessageFactory,
    TrainingCandidateFactory,
    TrainingRunFactory,
    UserFactory,
    bot_reply,
    staff_user,
)

pytestmark = pytest.mark.django_db

# Models a person may add in the admin (others are written by services or commands);
# the bot profile only while there is none (there is one while the pages are walked).
ADDABLE = {"auth.user", "auth.group", "finetune.ticket"}
ADDABLE_WHILE_NONE = {"conversations.botprofile"}
# Models whose rows the admin may delete (reviews, candidates and queue entries are a log).
DELETABLE = {
    "auth.user",
    "auth.group",
    "finetune.ticket",
    "finetune.datasetversion",
    "finetune.trainingrun",
    "finetune.modelversion",
    "finetune.modelversionevent",
    "conversations.botprofile",
    "conversations.conversation",
    "conversations.message",
}

ROLES = ("superuser", "model_admin", "agent", "customer")


def user_for(role: str):
    if role == "superuser":
        return UserFactory(username="root", is_staff=True, is_superuser=True)
    if role == "model_admin":
        return staff_user(MODEL_ADMINS, "morgan")
    if role == "agent":
        return staff_user(SUPPORT_AGENTS, "sam")
    return UserFactory(username="shopper")  # a customer: signed in, not staff


def perms_of(role: str) -> set[str]:
    return set(ROLE_PERMISSIONS.get({"model_admin": MODEL_ADMINS, "agent": SUPPORT_AGENTS}.get(role, ""), []))


def allowed(role: str, label: str, action: str) -> bool:
    if role == "customer":
        return False
    if role == "superuser":
        return True
    return f"{label.split('.')[0]}.{action}_{label.split('.')[1]}" in perms_of(role)


@pytest.fixture
def one_of_each():
    """A row of every registered model, so every change, history and delete page has something to show."""
    version = ModelVersionFactory(status=ModelVersion.Status.RETIRED)
    ModelVersionEvent.objects.create(version=version, action="promoted")
    TicketMessageFactory(ticket=TicketFactory())
    DatasetVersionFactory()
    TrainingRunFactory(status=TrainingRun.Status.FAILED)
    BotProfile.objects.create()
    reply = bot_reply(model_version=version)
    review = ReviewFactory(message=reply)
    TrainingCandidateFactory(review=review)
    QueueItemFactory(message=reply)
    Group.objects.get_or_create(name="Someone else's group")
    ConversationFactory(status=Conversation.Status.WAITING_FOR_AGENT)


def admin_pages():
    """(label, kind, url-maker) for every page of every registered model."""
    pages = []
    for model, model_admin in admin.site._registry.items():
        label = model._meta.label_lower
        info = (model._meta.app_label, model._meta.model_name)
        pages.append((label, "list", lambda obj, i=info: reverse("admin:{}_{}_changelist".format(*i))))
        pages.append((label, "add", lambda obj, i=info: reverse("admin:{}_{}_add".format(*i))))
        for kind in ("change", "history", "delete"):
            pages.append((label, kind, lambda obj, i=info, k=kind: reverse(f"admin:{i[0]}_{i[1]}_{k}", args=[obj.pk])))
        standard = {f"{info[0]}_{info[1]}_{k}" for k in ("changelist", "add", "history", "delete", "change")}
        for pattern in model_admin.get_urls():
            name = getattr(pattern, "name", None)
            if name and name not in standard:
                pages.append((label, f"custom:{name}", _custom_url(name, str(pattern.pattern))))
    return pages


def _custom_url(name: str, route: str):
    def make(obj):
        args = [obj.pk] if re.search(r"<[^>]+>", route) else []
        return reverse(f"admin:{name}", args=args)

    return make


def expected_status(role: str, label: str, kind: str) -> int | None:
    if role == "customer":
        return 302  # not staff: the admin sends them to its login page
    can_view = allowed(role, label, "view") or allowed(role, label, "change")
    if kind in ("list", "change", "history"):
        return 200 if can_view else 403
    if kind == "add":
        return 200 if label in ADDABLE and allowed(role, label, "add") else 403
    if kind == "delete":
        return 200 if label in DELETABLE and allowed(role, label, "delete") else 403
    return None  # custom views: checked for crashes and for refusing those without the model's permissions


@pytest.mark.parametrize("role", ROLES)
def test_every_admin_page_as_every_role(client, role, one_of_each):
    user = user_for(role)
    client.force_login(user)
    failures = []
    for label, kind, make_url in admin_pages():
        model = next(m for m in admin.site._registry if m._meta.label_lower == label)
        obj = model._default_manager.order_by("pk").first()
        url = make_url(obj)
        response = client.get(url)
        expected = expected_status(role, label, kind)
        status = response.status_code
        if status >= 500:
            failures.append(f"{role} {kind} {url}: server error {status}")
        elif expected is not None and status != expected:
            failures.append(f"{role} {kind} {url}: {status}, expected {expected}")
        elif (
            expected is None
            and role != "superuser"
            and not (allowed(role, label, "view") or allowed(role, label, "change"))
        ):
            if status == 405:  # a POST-only action: it must refuse the POST too
                status = client.post(url).status_code
            if status not in (302, 403):
                failures.append(f"{role} {kind} {url}: {status} for a role without access")
        if kind == "change" and status == 200 and not allowed(role, label, "change"):
            if b'name="_save"' in response.content:
                failures.append(f"{role} {kind} {url}: offers Save without the change permission")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("role", ["model_admin", "agent"])
def test_the_admin_index_lists_only_what_the_role_may_see(client, role):
    BotProfile.objects.all().delete()
    client.force_login(user_for(role))
    page = client.get(reverse("admin:index")).content.decode()
    for model in admin.site._registry:
        label = model._meta.label_lower
        link = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        visible = allowed(role, label, "view") or allowed(role, label, "change")
        assert (f'href="{link}"' in page) == visible, f"{role}: {label} visible={visible}"
        add = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")
        if f'href="{add}"' in page:
            assert label in ADDABLE | ADDABLE_WHILE_NONE, f"{role} is offered 'Add' for {label}"
            assert allowed(role, label, "add"), f"{role} is offered 'Add' for {label}"


def test_agents_are_not_offered_the_bot_profile(client):
    BotProfile.objects.all().delete()
    client.force_login(user_for("agent"))
    page = client.get(reverse("admin:index")).content.decode()
    assert "Bot profile" not in page
    assert client.get(reverse("admin:conversations_botprofile_add")).status_code == 403
    assert client.get(reverse("admin:conversations_botprofile_changelist")).status_code == 403


def test_the_model_admin_adds_the_first_bot_profile_and_only_one(client):
    BotProfile.objects.all().delete()
    client.force_login(user_for("model_admin"))
    add = reverse("admin:conversations_botprofile_add")
    response = client.post(
        add, {"company_name": "Globex", "system_prompt": "You help {company}.", "policy_text": "", "blocked_terms": ""}
    )
    assert response.status_code == 302
    assert BotProfile.objects.get().company_name == "Globex"
    assert client.get(add).status_code == 403  # one profile


@pytest.mark.parametrize(
    ("model", "label"),
    [(Review, "review"), (Message, "message"), (QueueItem, "queueitem"), (TrainingCandidate, "trainingcandidate")],
)
def test_logs_written_by_services_cannot_be_added_even_by_a_superuser(client, model, label):
    client.force_login(user_for("superuser"))
    add = reverse(f"admin:conversations_{label}_add")
    assert client.get(add).status_code == 403
    assert client.post(add, {}).status_code == 403
    assert model.objects.count() == 0


@pytest.mark.parametrize("label", ["datasetversion", "modelversionevent"])
def test_finetune_records_cannot_be_added_by_hand(client, label):
    client.force_login(user_for("superuser"))
    assert client.get(reverse(f"admin:finetune_{label}_add")).status_code == 403
    assert DatasetVersion.objects.count() == ModelVersionEvent.objects.count() == 0


def test_model_admins_approve_training_candidates_from_the_admin_and_agents_cannot(client):
    candidate = TrainingCandidateFactory()
    changelist = reverse("admin:conversations_trainingcandidate_changelist")
    client.force_login(user_for("model_admin"))
    response = client.post(changelist, {"action": "approve", "_selected_action": [candidate.pk]}, follow=True)
    assert "1 approved for training." in response.content.decode()
    candidate.refresh_from_db()
    assert candidate.status == TrainingCandidate.Status.APPROVED
    client.force_login(user_for("agent"))
    assert client.get(changelist).status_code == 403
