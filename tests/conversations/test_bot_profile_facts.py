"""The company's facts on the bot profile: edited in the admin, read by serving through the providers registry."""

from __future__ import annotations

import pytest

from conversations.models import BotProfile
from finetune.providers import chat_data
from supportbot.roles import MODEL_ADMINS
from tests.factories import staff_user

pytestmark = pytest.mark.django_db

FACTS = {
    "support_phone": "0800 555 0199",
    "support_email": "help@acme.example",
    "website_url": "https://acme.example",
    "support_hours": "Monday to Friday, 9:00-17:00",
    "returns_address": "Acme Returns, 1 Dock Road, Leeds",
}


def test_a_model_admin_edits_the_facts_in_the_admin(client):
    client.force_login(staff_user(MODEL_ADMINS, "morgan"))
    page = client.get("/admin/conversations/botprofile/add/").content.decode()
    assert "Company facts" in page
    assert "{{Customer Support Phone Number}}" in page  # the help text says where each fact goes
    form = {
        "company_name": "Acme",
        "system_prompt": "You are the assistant of {company}.",
        "policy_text": "",
        "blocked_terms": "",
        **FACTS,
    }
    response = client.post("/admin/conversations/botprofile/add/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    profile = BotProfile.objects.get()
    assert {name: getattr(profile, name) for name in FACTS} == FACTS


def test_a_bad_website_or_email_is_refused_with_a_message(client):
    client.force_login(staff_user(MODEL_ADMINS, "morgan"))
    form = {"company_name": "Acme", "system_prompt": "Hi", "support_email": "not-an-email", "website_url": "acme"}
    page = client.post("/admin/conversations/botprofile/add/", form).content.decode()
    assert "Enter a valid email address." in page
    assert "Enter a valid URL." in page
    assert not BotProfile.objects.exists()


def test_serving_reads_the_facts_through_the_providers_registry():
    assert chat_data().company_facts() == {"company_name": "Acme"}  # no profile saved: defaults
    BotProfile.objects.create(company_name="Globex", support_phone=" 0800 555 0199 ", support_hours="")
    assert chat_data().company_facts() == {"company_name": "Globex", "support_phone": "0800 555 0199"}
