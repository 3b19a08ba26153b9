"""Project-level Celery tasks."""

from __future__ import annotations

import os
import socket

from celery import shared_task
from django.db import connection


@shared_task(name="supportbot.ping")
def ping() -> dict:
    """Prove a worker is alive and reaches the database: returns who ran it and what it saw."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    from finetune.models import Ticket

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "database": connection.vendor,
        "tickets": Ticket.objects.count(),
    }
