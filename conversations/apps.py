from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    """Customer chat (websocket consumer, widget), handoff and takeover, and the agents' review work (``review/``)."""

    name = "conversations"

    def ready(self) -> None:
        from finetune.providers import chat_data_register

        from . import selectors
        from .review.selectors import training_examples_approved

        # Fine-tuning reads the chat only through these (finetune does not import this app).
        chat_data_register(
            feedback_examples=training_examples_approved,
            system_prompt=selectors.system_prompt_current,
            blocked_terms=selectors.blocked_terms_current,
            company_facts=selectors.company_facts_current,
        )
