"""Promotion gates: the checks a candidate version must pass before it may serve customers automatically.

- ``promotion_gate_register``: register a gate (other apps register more, e.g. bias checks);
- ``model_version_gates_evaluate``: run every gate against the active version;
- the built-in ``validation_loss`` gate: the candidate's validation loss is no worse than
  the active version's on the same validation set, scored by ``validation_reference_losses``
  while the run trains when the active version was measured on another set;
- the ``bias_probe`` gate: the candidate's latest counterfactual-probe report
  (``BiasReport``, ``services/bias.py``) passed.

A manual promotion over a failed gate needs a reason (``model_versions``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from django.utils import timezone

from finetune import selectors
from finetune.models import ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


PromotionGate = Callable[[ModelVersion, ModelVersion | None], GateResult]
_PROMOTION_GATES: dict[str, PromotionGate] = {}


def promotion_gate_register(name: str) -> Callable[[PromotionGate], PromotionGate]:
    """Register ``gate(candidate, active) -> GateResult``; every registered gate must pass for auto-promotion."""

    def decorator(gate: PromotionGate) -> PromotionGate:
        _PROMOTION_GATES[name] = gate
        return gate

    return decorator


def promotion_gates() -> dict[str, PromotionGate]:
    return dict(_PROMOTION_GATES)


def model_version_gates_evaluate(
    *, version: ModelVersion, active: ModelVersion | None = None, save: bool = True
) -> dict[str, Any]:
    """Run every gate against the active version (the current one unless given); store the results if ``save``."""
    if active is None:
        active = selectors.model_version_active()
        if active is not None and active.pk == version.pk:
            active = None
    results: dict[str, Any] = {}
    for name, gate in _PROMOTION_GATES.items():
        try:
            outcome = gate(version, active)
        except Exception as exc:  # a broken gate must block promotion, not crash it
            log.exception("Promotion gate %s failed to run", name)
            outcome = GateResult(False, f"The gate could not run ({type(exc).__name__}: {exc}).")
        results[name] = asdict(outcome)
    summary = {
        "passed": all(r["passed"] for r in results.values()),
        "compared_with": active.label if active else None,
        "compared_with_id": active.pk if active else None,
        "evaluated_at": timezone.now().isoformat(),
        "gates": results,
    }
    if save:
        version.gate_results = summary
        version.save(update_fields=["gate_results"])
    return summary


def gate_failures_text(gate_results: dict[str, Any]) -> str:
    failed = [f"{name}: {r['detail']}" for name, r in (gate_results.get("gates") or {}).items() if not r["passed"]]
    return "failed gates: " + "; ".join(failed) if failed else "no gate failed"


@promotion_gate_register("validation_loss")
def _gate_validation_loss(candidate: ModelVersion, active: ModelVersion | None) -> GateResult:
    """The candidate's validation loss is no worse than the active version's on the same validation set."""
    loss = (candidate.metrics or {}).get("eval_loss")
    if loss is None:
        return GateResult(False, "The candidate has no validation loss: its dataset has no validation split.")
    if active is None:
        return GateResult(True, "No version is active yet, so there is nothing to be worse than.", {"candidate": loss})
    reference = (candidate.metrics.get("reference_losses") or {}).get(str(active.pk))
    fingerprint = candidate.metrics.get("validation_fingerprint")
    same_set = fingerprint is not None and (active.metrics or {}).get("validation_fingerprint") == fingerprint
    if reference is None and same_set and active.base_model == candidate.base_model:
        reference = (active.metrics or {}).get("eval_loss")
    if reference is None:
        return GateResult(
            False,
            f"{active.label} has not been scored on this candidate's validation set (a different base model, or it "
            "became active after this run), so the losses cannot be compared. Compare the metrics and promote with "
            "a reason, or retrain.",
            {"candidate": loss},
        )
    passed = loss <= reference + 1e-9
    verdict = "no worse than" if passed else "worse than"
    return GateResult(
        passed,
        f"Validation loss {loss:.4f} is {verdict} {active.label}'s {reference:.4f} on the same validation set.",
        {"candidate": loss, "active": reference},
    )


@promotion_gate_register("bias_probe")
def _gate_bias_probe(candidate: ModelVersion, active: ModelVersion | None) -> GateResult:
    """The candidate's latest counterfactual-probe report passed: no register, name or pronoun group
    got significantly and materially worse replies (docs/bias-monitoring.md)."""
    report = selectors.bias_report_latest(candidate)
    probe_it = f"run manage.py bias_probe --version {candidate.number}"
    if report is None:
        return GateResult(False, f"{candidate.label} has not been probed for bias yet; {probe_it}.")
    values = {"report": report.pk, "status": report.status}
    if report.passed:
        return GateResult(True, "The counterfactual probes found no group served worse.", values)
    if report.status == report.Status.FAIL:
        shown = "; ".join(report.failures[:3]) + ("; …" if len(report.failures) > 3 else "")
        return GateResult(False, f"The counterfactual probes flagged {len(report.failures)}: {shown}", values)
    if report.status == report.Status.INSUFFICIENT:
        return GateResult(
            False,
            f"The probe asked too few requests for a verdict (SUPPORTBOT_BIAS_PROBE_REQUESTS); {probe_it}.",
            values,
        )
    return GateResult(False, f"The bias probe could not run ({report.error}); {probe_it}.", values)


def validation_reference_losses(
    *, base_model: str, dataset_path: str, config, metrics: dict[str, Any], note: Callable[[str], None]
) -> dict[str, float]:
    """The active version's loss on a run's validation set, when the gate needs it and can have it.

    Not needed when the active version was measured on the same validation set; not
    meaningful for a different base model (another tokenizer counts tokens differently).
    ``note`` receives what happens, for the run's log. Returns ``{active version id: loss}``.
    """
    from finetune.ml.training import validation_loss

    active = selectors.model_version_active()
    if active is None or metrics.get("eval_loss") is None:
        return {}
    same_set = (active.metrics or {}).get("validation_fingerprint") == metrics.get("validation_fingerprint")
    if same_set or active.base_model != base_model:
        return {}
    if not active.merged_path or not Path(active.merged_path).is_dir():
        note(f"Cannot score {active.label} on this validation set: its merged model is missing")
        return {}
    note(f"Scoring the active {active.label} on this run's validation set for the promotion gate")
    scored = validation_loss(active.merged_path, dataset_path, config)
    if scored["eval_loss"] is None:
        return {}
    return {str(active.pk): scored["eval_loss"]}
