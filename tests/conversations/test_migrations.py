"""The one-open-conversation migration closes older duplicates before it adds the rule."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("conversations", "0001_initial")]
AFTER = [("conversations", "0002_one_open_conversation")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture(autouse=True)
def _back_to_the_latest_schema():
    yield
    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())  # for the tests after this one


def test_older_open_duplicates_are_closed_and_the_newest_kept():
    apps = migrate(BEFORE)
    Conversation = apps.get_model("conversations", "Conversation")
    User = apps.get_model("auth", "User")
    now = timezone.now()
    older = Conversation.objects.create(session_key="s" * 32, started_at=now - timedelta(hours=2))
    newer = Conversation.objects.create(session_key="s" * 32, started_at=now - timedelta(hours=1))
    alone = Conversation.objects.create(session_key="t" * 32, started_at=now)
    closed = Conversation.objects.create(session_key="t" * 32, started_at=now, status="closed")
    user = User.objects.create(username="migrated-customer")
    user_old = Conversation.objects.create(session_key="a" * 32, customer=user, started_at=now - timedelta(days=1))
    user_new = Conversation.objects.create(session_key="b" * 32, customer=user, started_at=now)

    apps = migrate(AFTER)
    Conversation = apps.get_model("conversations", "Conversation")
    status = dict(Conversation.objects.values_list("pk", "status"))
    assert status[older.pk] == "closed"
    assert status[user_old.pk] == "closed"
    assert {status[newer.pk], status[alone.pk], status[user_new.pk]} == {"bot"}
    assert status[closed.pk] == "closed"
    assert Conversation.objects.get(pk=older.pk).ended_at is not None
