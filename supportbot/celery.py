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

# Before torch is imported (its OpenMP pool reads this once): training in the worker shares
# the cores with daphne, and spinning OpenMP threads triple the CPU time of the same work
# under contention (docs/quality-research.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from celery import Celery  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")

app = Celery("supportbot")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
