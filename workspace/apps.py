"""The agents' workspace (``/agent/``): the pages and the socket support agents and admins work in.

Its own app rather than a part of ``conversations`` because it is an interface, not a
domain: server-rendered pages, their JavaScript and CSS, and the agents' websocket
consumer, all for staff, under their own URL prefix. The rules they use (queues,
claims, reviews, takeover, training candidates) live in ``conversations`` (services
and selectors), which knows nothing of this app; nothing depends on it, so the
monitoring dashboards of later work (``/agent/monitoring/``) can join it here.
"""

from django.apps import AppConfig


class WorkspaceConfig(AppConfig):
    name = "workspace"
    verbose_name = "Agent workspace"
