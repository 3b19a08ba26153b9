"""The agents' list of conversations in the admin."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from supportbot.roles import SUPPORT_AGENTS
from tests.factories import ConversationFactory, MessageFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def agent_client(client):
    agent = UserFactory(username="agent-a", is_staff=True)
    agent.groups.add(Group.objects.get(name=SUPPORT_AGENTS))
    client.force_login(agent)
    return client


def test_the_list_shows_each_conversations_first_customer_message(agent_client):
    conversation = ConversationFactory()
    MessageFactory(conversation=conversation, role="system", body="A support agent will join this chat.")
    MessageFactory(conversation=conversation, role="customer", body="My parcel never arrived " + "x" * 200)
    MessageFactory(conversation=conversation, role="customer", body="Hello??")
    handed_over = ConversationFactory(session_key="other-session-key-0000000000000000")  # "Talk to a human" only

    page = agent_client.get("/admin/conversations/conversation/").content.decode()
    assert "First message" in page
    assert "My parcel never arrived " + "x" * 76 + "…" in page
    assert "Hello??" not in page
    assert str(handed_over.pk)[:8] in page
