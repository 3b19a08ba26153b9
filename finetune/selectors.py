"""Read-side queries for tickets, datasets, runs and model versions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import ModelVersion, TrainingRun


def model_version_active() -> ModelVersion | None:
    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()


def training_run_live(lane: str = "default") -> TrainingRun | None:
    return TrainingRun.objects.filter(lane=lane, status__in=TrainingRun.LIVE_STATUSES).first()


@dataclass(frozen=True)
class MetricRow:
    label: str
    candidate: Any
    active: Any
    better: bool | None  # is the candidate better? None: not comparable or not a quality metric
    note: str = ""

    @property
    def candidate_text(self) -> str:
        return _text(self.candidate)

    @property
    def active_text(self) -> str:
        return _text(self.active)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# (metrics key, label, higher is better?)
_COMPARED = (
    ("eval_loss", "Validation loss", False),
    ("perplexity", "Validation perplexity", False),
    ("rouge_l", "ROUGE-L of generated replies", True),
    ("rouge_l_retrieval", "ROUGE-L of the retrieval baseline", None),
    ("train_loss_last", "Final training loss", None),
    ("num_train", "Training examples", None),
    ("num_validation", "Validation examples", None),
    ("tokens_per_second", "Training speed (tokens/s)", None),
)


def model_version_comparison(version: ModelVersion, active: ModelVersion | None = None) -> list[MetricRow]:
    """Metrics of ``version`` beside the active version's, for the promotion page."""
    if active is None:
        active = model_version_active()
    if active is not None and active.pk == version.pk:
        active = None
    mine, theirs = version.metrics or {}, (active.metrics or {}) if active else {}
    rows = [
        MetricRow("Base model", version.base_model, active.base_model if active else None, None),
        MetricRow(
            "Dataset",
            str(version.dataset_version or "—"),
            str(active.dataset_version or "—") if active else None,
            None,
        ),
    ]
    same_set = bool(mine.get("validation_fingerprint")) and mine.get("validation_fingerprint") == theirs.get(
        "validation_fingerprint"
    )
    for key, label, higher in _COMPARED:
        a, b = mine.get(key), theirs.get(key)
        better = None
        if higher is not None and isinstance(a, int | float) and isinstance(b, int | float):
            better = a > b if higher else a < b
        note = ""
        if key == "eval_loss" and active is not None:
            reference = (mine.get("reference_losses") or {}).get(str(active.pk))
            if reference is not None:
                b = reference
                better = a < b if isinstance(a, int | float) else None
                note = f"{active.label} scored on this version's validation set"
            elif not same_set:
                better = None
                note = "measured on different validation sets"
        rows.append(MetricRow(label, a, b if active else None, better, note))
    return rows
