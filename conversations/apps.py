from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    """Customer chat (websocket consumer, widget), handoff and takeover, and the agents' review work (``review/``)."""

    name = "conversations"
