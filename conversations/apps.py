from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    """Customer chat (websocket consumer, widget), agent review console and feedback."""

    name = "conversations"

    def ready(self) -> None:
        from finetune.providers import chat_data_register

        from . import selectors

        # Fine-tuning reads the chat only through these (finetune does not import this app).
        chat_data_register(
            feedback_examples=selectors.feedback_training_examples,
            system_prompt=selectors.system_prompt_current,
            blocked_terms=selectors.blocked_terms_current,
        )
