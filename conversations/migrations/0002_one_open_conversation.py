"""At most one open conversation per anonymous session and per signed-in customer.

Before the constraints, any older open duplicates (two tabs that raced before this
rule existed) are closed, so the constraints can be added to an existing database;
their messages stay as they are.
"""

from django.conf import settings
from django.db import migrations, models
from django.utils import timezone


def close_older_duplicates(apps, schema_editor):
    Conversation = apps.get_model("conversations", "Conversation")
    open_ones = Conversation.objects.exclude(status="closed").order_by("-started_at")
    seen: set[tuple[str, object]] = set()
    stale = []
    for pk, session_key, customer_id in open_ones.values_list("pk", "session_key", "customer_id").iterator():
        if customer_id is not None:
            key = ("customer", customer_id)
        elif session_key:
            key = ("session", session_key)
        else:
            continue
        if key in seen:
            stale.append(pk)
        else:
            seen.add(key)
    for start in range(0, len(stale), 500):
        Conversation.objects.filter(pk__in=stale[start : start + 500]).update(status="closed", ended_at=timezone.now())


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RunPython(close_older_duplicates, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="conversation",
            constraint=models.UniqueConstraint(
                condition=models.Q(
                    ("customer__isnull", True),
                    models.Q(("session_key", ""), _negated=True),
                    models.Q(("status", "closed"), _negated=True),
                ),
                fields=("session_key",),
                name="conversation_one_open_per_session",
            ),
        ),
        migrations.AddConstraint(
            model_name="conversation",
            constraint=models.UniqueConstraint(
                condition=models.Q(("customer__isnull", False), models.Q(("status", "closed"), _negated=True)),
                fields=("customer",),
                name="conversation_one_open_per_customer",
            ),
        ),
    ]
