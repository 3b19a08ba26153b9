"""The real parts work: PostgreSQL, the Redis channel layer and a Celery worker process."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, transaction

from conversations.models import Message
from finetune.models import ModelVersion, Ticket, TrainingRun
from supportbot.tasks import ping
from tests.factories import (
    MessageFactory,
    ModelVersionFactory,
    TicketFactory,
    TicketMessageFactory,
    TrainingRunFactory,
)

pytestmark = pytest.mark.django_db


def test_orm_round_trip_on_postgres(postgres):
    ticket = TicketFactory(tags=["P", "Z"], customer_identifiers=["ORD-1"])
    TicketMessageFactory(ticket=ticket, position=0, body="Where is ORD-1?")
    TicketMessageFactory(ticket=ticket, position=1, role="agent", body="On its way.")
    loaded = Ticket.objects.prefetch_related("messages").get(pk=ticket.pk)
    assert loaded.tags == ["P", "Z"]
    assert [m.body for m in loaded.messages.all()] == ["Where is ORD-1?", "On its way."]
    # JSON containment is PostgreSQL-only (SQLite lacks it), so this proves the backend.
    assert Ticket.objects.filter(tags__contains=["Z"]).count() == 1


def test_only_one_active_model_version(postgres):
    ModelVersionFactory(status=ModelVersion.Status.ACTIVE)
    ModelVersionFactory(status=ModelVersion.Status.CANDIDATE)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersionFactory(status=ModelVersion.Status.ACTIVE)


def test_only_one_live_training_run(postgres):
    TrainingRunFactory(status=TrainingRun.Status.RUNNING)
    TrainingRunFactory(status=TrainingRun.Status.SUCCEEDED)
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingRunFactory(status=TrainingRun.Status.QUEUED)


def test_client_id_unique_per_conversation(postgres):
    message = MessageFactory(client_id="c-1")
    MessageFactory(client_id="c-1")  # another conversation: allowed
    MessageFactory(conversation=message.conversation, client_id="")  # bot replies have none
    MessageFactory(conversation=message.conversation, client_id="")
    with pytest.raises(IntegrityError), transaction.atomic():
        MessageFactory(conversation=message.conversation, client_id="c-1")
    assert Message.objects.filter(conversation=message.conversation).count() == 3


def test_channel_layer_group_send_receive_on_redis(redis_url):
    layer = get_channel_layer()
    assert type(layer).__name__ == "RedisChannelLayer"
    group = f"test.{uuid.uuid4().hex}"

    async def round_trip():
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        await layer.group_send(group, {"type": "chat.message", "text": "hello"})
        received = await layer.receive(channel)
        await layer.group_discard(group, channel)
        return received

    assert async_to_sync(round_trip)() == {"type": "chat.message", "text": "hello"}


def test_celery_task_runs_in_a_real_worker(celery_worker_process):
    TicketFactory()
    TicketFactory()
    result = ping.apply_async(queue=celery_worker_process)
    outcome = result.get(timeout=60)
    import os

    assert outcome["pid"] != os.getpid()  # another process ran it
    assert outcome["tickets"] == 2  # and it read the test database
