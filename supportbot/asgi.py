"""ASGI entry point: HTTP through Django, websockets through Channels.

``get_asgi_application()`` runs first so the app registry is ready before
consumers (which import models) are imported. With ``SUPPORTBOT_PRELOAD_MODEL`` on
(the default), the process starts loading the active model version in the
background as it starts, instead of on the first customer's reply. Under daphne it
also starts following promotions at once (``model_listener_start``: the channel-layer
event and a periodic check of the active version), not at the first reply.
"""

import logging
import os

# Before torch is imported (its OpenMP pool reads this once): generation shares the cores
# with the Celery worker, and spinning OpenMP threads triple the CPU time of the same work
# under contention (docs/quality-research.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from django.core.asgi import get_asgi_application  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
# Tells settings this process is the ASGI server (DJANGO_DB_POOL=auto pools connections
# here, never in a Celery worker). Has no effect where settings were loaded already, and
# is removed again so that processes started from this one do not inherit it.
_marked = "SUPPORTBOT_PROCESS" not in os.environ
os.environ.setdefault("SUPPORTBOT_PROCESS", "asgi")
django_asgi_app = get_asgi_application()
if _marked:
    del os.environ["SUPPORTBOT_PROCESS"]

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import re_path  # noqa: E402

from conversations.lifecycle import install_server_hooks  # noqa: E402
from conversations.routing import websocket_urlpatterns  # noqa: E402
from finetune.serving.runtime import model_listener_start, preload_start  # noqa: E402
from workspace.routing import websocket_urlpatterns as workspace_websocket_urlpatterns  # noqa: E402


async def websocket_not_found(scope, receive, send) -> None:
    """Any other websocket path: refused at the handshake (HTTP 403), logged in one line.

    Without it the router raises "No route found", which daphne logs as a traceback and
    answers with 500.
    """
    if (await receive())["type"] == "websocket.connect":
        logging.getLogger("supportbot.asgi").info("Websocket to unknown path %r refused", scope.get("path", "")[:200])
        await send({"type": "websocket.close"})


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(
                URLRouter([*websocket_urlpatterns, *workspace_websocket_urlpatterns, re_path(r"", websocket_not_found)])
            )
        ),
    }
)

if settings.SUPPORTBOT_PRELOAD_MODEL:
    preload_start()
# Under daphne: at start, listen for promotions and watch the active version (so this
# process follows a promotion made anywhere) and sweep replies dead processes left
# streaming; drain on SIGTERM.
install_server_hooks(also_on_start=[model_listener_start])
