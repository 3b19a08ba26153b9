from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    """Customer chat (websocket consumer, widget), agent review console and feedback."""

    name = "conversations"
