"""Read-side queries for tickets, datasets, runs and model versions."""

from __future__ import annotations

from .models import ModelVersion


def model_version_active() -> ModelVersion | None:
    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()
