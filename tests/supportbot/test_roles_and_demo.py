"""Roles exist after migrate; the demo logins work in the admin."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from supportbot.roles import MODEL_ADMINS, SUPPORT_AGENTS

pytestmark = pytest.mark.django_db


def test_groups_carry_their_permissions():
    agents = Group.objects.get(name=SUPPORT_AGENTS)
    admins = Group.objects.get(name=MODEL_ADMINS)
    agent_perms = {f"{p.content_type.app_label}.{p.codename}" for p in agents.permissions.all()}
    admin_perms = {f"{p.content_type.app_label}.{p.codename}" for p in admins.permissions.all()}
    # Agents work in the workspace; in the admin they only read (reviews are made in the workspace).
    assert "conversations.review_conversations" in agent_perms
    assert not {p for p in agent_perms if p.split(".")[1].startswith(("add_", "change_", "delete_"))}
    assert "finetune.retrain_model" not in agent_perms
    assert "conversations.approve_trainingcandidate" not in agent_perms
    assert {"finetune.retrain_model", "finetune.promote_modelversion"} <= admin_perms
    assert {"conversations.approve_trainingcandidate", "conversations.change_botprofile"} <= admin_perms


def test_demo_logins_open_the_admin(client, capsys):
    call_command("demo_setup")
    printed = capsys.readouterr().out
    assert "admin  password: supportbot-admin" in printed
    assert client.login(username="admin", password="supportbot-admin")
    assert client.get("/admin/").status_code == 200
    client.logout()
    assert client.login(username="agent", password="supportbot-agent")
    response = client.get("/admin/finetune/trainingrun/")
    assert response.status_code == 403  # agents review conversations, they do not retrain
    assert client.get("/admin/conversations/conversation/?status__exact=waiting_for_agent").status_code == 200


def test_demo_setup_keeps_existing_passwords(client):
    call_command("demo_setup")
    from django.contrib.auth import get_user_model

    admin = get_user_model().objects.get(username="admin")
    admin.set_password("changed-by-the-team")
    admin.save()
    call_command("demo_setup")
    assert client.login(username="admin", password="changed-by-the-team")


def test_demo_setup_refuses_in_production():
    with override_settings(IS_PRODUCTION=True), pytest.raises(CommandError, match="refuses"):
        call_command("demo_setup")


def test_home_page_links_the_product(client):
    body = client.get("/").content.decode()
    for link in ("/chat/", "/agent/", "/admin/", "/healthz"):
        assert f'href="{link}"' in body
