from django.apps import AppConfig


class FinetuneConfig(AppConfig):
    """Tickets, datasets, LoRA training, model versions and the inference engine."""

    name = "finetune"
    verbose_name = "Fine-tuning"
