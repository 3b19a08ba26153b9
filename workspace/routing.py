"""Websocket routes of the agents' workspace (mounted by ``supportbot/asgi.py``)."""

from django.urls import path

from .consumers import AgentConsumer

websocket_urlpatterns = [
    path("ws/agent/", AgentConsumer.as_asgi(), name="ws-agent"),
    path("ws/agent/conversations/<uuid:conversation_id>/", AgentConsumer.as_asgi(), name="ws-agent-conversation"),
]
