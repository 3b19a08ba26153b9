"""Promotion gates: the checks a candidate version must pass before it may serve customers automatically.

- ``promotion_gate_register``: register a gate (other apps register more, e.g. bias checks);
- ``model_version_gates_evaluate``: run every gate against the active version;
- the built-in ``validation_loss`` gate: the candidate's validation loss is no worse than
  the active version's on the same validation set, scored by ``validation_reference_losses``
  while the run trains when the active version was measured on another set;
- the built-in ``reply_quality`` gate (issue 10): the replies customers would get from the
  candidate (its served path on a validation sample, ``finetune.ml.quality``) beat the
  retrieval baseline on ROUGE-L and intent accuracy, fall below the active version's by
  no more than ``SUPPORTBOT_GATE_QUALITY_MARGIN``, and show no template slot and no
  repeated sentence. The rows it compares (with example replies) are on the version's
  ``metrics["quality"]``; the admin's version page shows them side by side.
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

from django.conf import settings
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
    advisory = set(settings.SUPPORTBOT_GATES_ADVISORY)
    for name in advisory & set(results):
        results[name]["advisory"] = True  # shown, not blocking (settings.SUPPORTBOT_GATES_ADVISORY)
    summary = {
        "passed": all(r["passed"] for name, r in results.items() if name not in advisory),
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
    gates = (gate_results.get("gates") or {}).items()
    failed = [f"{name}: {r['detail']}" for name, r in gates if not r["passed"] and not r.get("advisory")]
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


@promotion_gate_register("reply_quality")
def _gate_reply_quality(candidate: ModelVersion, active: ModelVersion | None) -> GateResult:
    """The candidate's served replies beat retrieval, keep up with the active version, leak no slot, never loop."""
    quality = (candidate.metrics or {}).get("quality") or {}
    rows = quality.get("rows") or {}
    mine, retrieval = rows.get("candidate"), rows.get("retrieval")
    if not mine or not retrieval:
        return GateResult(
            False,
            "The candidate's replies were not scored against the retrieval baseline (no validation split, or a run "
            "from before the quality evaluation). Compare by hand and promote with a reason, or retrain.",
        )
    margin = float(settings.SUPPORTBOT_GATE_QUALITY_MARGIN)
    target = float(settings.SUPPORTBOT_GATE_INTENT_ACCURACY)
    values: dict[str, Any] = {
        "examples": mine["n"],
        "margin": margin,
        "intent_target": target,
        "candidate": _row_numbers(mine),
        "retrieval": _row_numbers(retrieval),
    }
    problems: list[str] = []
    if not mine["rouge_l"] > retrieval["rouge_l"]:
        problems.append(
            f"ROUGE-L {mine['rouge_l']:.3f} does not beat the retrieval baseline's {retrieval['rouge_l']:.3f}"
        )
    intent, retrieval_intent = mine.get("intent_accuracy"), retrieval.get("intent_accuracy")
    if intent is not None and retrieval_intent is not None and not (intent > retrieval_intent or intent >= target):
        problems.append(
            f"intent accuracy {intent:.3f} neither beats the retrieval baseline's {retrieval_intent:.3f} "
            f"nor reaches {target:.2f}"
        )
    if mine["slot_leaks"]:
        problems.append(f"{mine['slot_leaks']} of {mine['n']} replies show a template slot")
    if mine["repeats"]:
        problems.append(f"{mine['repeats']} of {mine['n']} replies repeat themselves")
    if active is not None:
        theirs = rows.get("active")
        if not theirs or quality.get("active_version_id") != active.pk:
            problems.append(
                f"{active.label}'s replies were not scored on this validation sample (its model is missing, or it "
                "became active after this run), so the two cannot be compared"
            )
        else:
            values["active"] = _row_numbers(theirs)
            for metric, name in (("rouge_l", "ROUGE-L"), ("intent_accuracy", "intent accuracy")):
                if mine.get(metric) is None or theirs.get(metric) is None:
                    continue
                if mine[metric] < theirs[metric] - margin - 1e-9:
                    problems.append(
                        f"{name} {mine[metric]:.3f} is below {active.label}'s {theirs[metric]:.3f} by more than "
                        f"the margin {margin:.2f}"
                    )
    if problems:
        return GateResult(False, _sentence("; ".join(problems) + f" (on {mine['n']} validation replies)"), values)
    against = f" and within {margin:.2f} of {active.label}" if active is not None else ""
    shown = f"ROUGE-L {mine['rouge_l']:.3f} vs {retrieval['rouge_l']:.3f}"
    if intent is not None and retrieval_intent is not None:
        shown += f", intent accuracy {intent:.3f} vs {retrieval_intent:.3f}"
    return GateResult(
        True,
        f"The replies beat the retrieval baseline ({shown}){against}, with no template slot and no repeat "
        f"(on {mine['n']} validation replies).",
        values,
    )


def _row_numbers(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("rouge_l", "intent_accuracy", "slot_leaks", "repeats", "model_replies", "retrieved", "handoffs", "n")
    return {k: row.get(k) for k in keys}


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


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
    if report.status == report.Status.RUNNING:
        since = timezone.localtime(report.created_at).strftime("%Y-%m-%d %H:%M")
        return GateResult(
            False,
            f"The bias probe of {candidate.label} is running (since {since}); wait for it (the run's log says when "
            f"it is done). If it stopped with its process, {probe_it}.",
            values,
        )
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
