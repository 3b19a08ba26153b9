"""The Celery application. Configuration comes from Django settings (``CELERY_*``).

Start a worker with ``make worker``, i.e.
``celery -A supportbot worker --pool=solo --loglevel=INFO``: the solo pool,
because torch and OpenMP can hang in a forked prefork child, and training uses
every core anyway.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")

app = Celery("supportbot")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
