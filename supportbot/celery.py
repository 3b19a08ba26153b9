"""The Celery application. Configuration comes from Django settings (``CELERY_*``).

Start a worker with ``make worker``, i.e.
``celery -A supportbot worker --pool=solo -Q default,training --loglevel=INFO``: the solo pool,
because torch and OpenMP can hang in a forked prefork child, and training uses
every core anyway.

Queues: retrain tasks go to ``training`` (``SUPPORTBOT_TRAINING_QUEUE``), everything
else to ``default`` (settings ``CELERY_TASK_ROUTES``). In production a GPU box runs
``celery -A supportbot worker --pool=solo -Q training -c 1`` and CPU boxes run
``-Q default`` (docs/deploy.md); one process may consume both, as ``make worker`` does.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")

app = Celery("supportbot")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
