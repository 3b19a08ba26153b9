"""Database helpers the apps share."""

from __future__ import annotations

from django.db import connection


def advisory_lock(name: str) -> None:
    """Serialise a critical section across processes (PostgreSQL advisory lock, held to commit).

    Call it inside a transaction; the lock is released when that transaction ends.
    SQLite takes a database-wide write lock on the first write, and the services'
    constraints catch anything that slips through, so it needs nothing more.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"supportbot:{name}"])
