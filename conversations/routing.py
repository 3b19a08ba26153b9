"""Websocket URL routes (mounted by ``supportbot/asgi.py``)."""

websocket_urlpatterns: list = []
