"""Websocket URL routes (mounted by ``supportbot/asgi.py``)."""

from django.urls import path

from .consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi(), name="ws-chat"),
    path("ws/chat/<uuid:conversation_id>/", ChatConsumer.as_asgi(), name="ws-chat-conversation"),
]
