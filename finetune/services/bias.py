"""Counterfactual bias probes of a model version, recorded as a ``BiasReport``.

``bias_probe_run`` asks the version the probe set's requests in every register and with
names and pronouns across genders and origins (``finetune.ml.probes.run_probes``),
and records what it found. It runs from ``manage.py bias_probe`` and after every
training run (``training_runs``); the ``bias_probe`` promotion gate (``gates``) reads the
latest report. A probe that cannot run (files missing, out of memory) is recorded as
``error`` with the reason, never raised: a training run must not fail because of it,
and the gate then blocks automatic promotion until someone probes again.

Keeps-the-intent needs an intent classifier of replies: the version's own
(``<version dir>/intent``, the reply-quality work's ``IntentClassifier``) when it
ships one, else one trained here on the historical tickets' agent replies; with
fewer than two intents there, that measure is left out (the report says so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.conf import settings

from finetune import providers, selectors
from finetune.models import BiasReport, ModelVersion

log = logging.getLogger(__name__)

Generate = Callable[[list[str]], list[str]]
PROBE_BATCH = 16  # replies generated at once: CPU-friendly, and a GPU is far from full at 64 tokens


def _model_path(version: ModelVersion) -> str:
    path = version.merged_path or version.adapter_path
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(
            f"The files of {version.label} are missing ({path or 'no path recorded'}); it cannot be probed."
        )
    return path


def version_generator(version: ModelVersion, *, max_new_tokens: int) -> Generate:
    """Greedy replies of the version to single customer messages, with the chat's system prompt."""
    from finetune.ml.evaluation import generate_replies
    from finetune.ml.prompting import ROLE_CUSTOMER, ROLE_SYSTEM, render_prompt, stop_sequences
    from finetune.serving.loading import load_for_inference

    loaded = load_for_inference(_model_path(version), label=version.label)
    system = providers.chat_data().system_prompt()
    stops = stop_sequences(loaded.tokenizer)

    def generate(texts: list[str]) -> list[str]:
        turns = [[{"role": ROLE_SYSTEM, "content": system}] if system else [] for _ in texts]
        prompts = [
            render_prompt([*turn, {"role": ROLE_CUSTOMER, "content": text}], loaded.tokenizer)
            for turn, text in zip(turns, texts, strict=True)
        ]
        return generate_replies(
            loaded.model,
            loaded.tokenizer,
            prompts,
            stops=stops,
            max_new_tokens=max_new_tokens,
            batch_size=PROBE_BATCH,
            device=loaded.device,
        )

    return generate


def intent_classifier_for(version: ModelVersion) -> tuple[Callable[[str], str] | None, str]:
    """The reply-intent predictor for keeps-the-intent, and where it came from."""
    from finetune.ml.intent import IntentClassifier, IntentClassifierError
    from finetune.ml.knowledge import INTENT_DIR  # beside the version's adapter/ and merged/ folders

    for base in (version.adapter_path, version.merged_path):
        if base and (Path(base).parent / INTENT_DIR).is_dir():
            try:
                own = IntentClassifier.load(Path(base).parent / INTENT_DIR)
                return _predictor(own), f"{version.label}'s own classifier"
            except IntentClassifierError as exc:
                log.warning("Ignoring %s's intent classifier: %s", version.label, exc)
    replies, intents = selectors.ticket_replies_with_intent()
    if len(set(intents)) < 2:
        return None, "no intent classifier (fewer than two ticket intents): keeps-the-intent not measured"
    return _predictor(IntentClassifier.train(replies, intents)), f"trained on {len(replies)} ticket replies"


def _predictor(classifier) -> Callable[[str], str]:
    return lambda reply: classifier.predict([reply])[0]


def bias_probe_run(
    *,
    version: ModelVersion,
    trigger: str = "command",
    generate: Generate | None = None,
    intent_of: Callable[[str], str] | None = None,
    requests: int | None = None,
    report: BiasReport | None = None,
) -> BiasReport:
    """Probe ``version`` and record a ``BiasReport`` (status error, with the reason, if it cannot run).

    ``generate`` and ``intent_of`` default to the version's own model and an intent
    classifier (``intent_classifier_for``); ``requests`` to ``SUPPORTBOT_BIAS_PROBE_REQUESTS``.
    ``report``: a ``running`` report recorded earlier (``bias_report_start``) to finish;
    else one is recorded as ``running`` now, so the gate says the probe is under way.
    """
    from finetune.ml.probe_set import PROBES
    from finetune.ml.probes import run_probes

    count = requests or settings.SUPPORTBOT_BIAS_PROBE_REQUESTS
    thresholds = selectors.bias_thresholds()
    recorded: dict[str, Any] = {
        "requests": min(count, len(PROBES)),
        "max_new_tokens": settings.SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS,
        "thresholds": asdict(thresholds),
    }
    started = time.monotonic()
    if report is None:
        report = bias_report_start(version=version, trigger=trigger)
    try:
        if generate is None:
            generate = version_generator(version, max_new_tokens=settings.SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS)
        if intent_of is None:
            intent_of, source = intent_classifier_for(version)
        else:
            source = "given"
        recorded["intent_classifier"] = source
        # Spread over the intents: the probe set lists two requests per intent, in intent order.
        chosen = (PROBES[0::2] + PROBES[1::2])[: recorded["requests"]]
        found = run_probes(
            generate,
            intent_of,
            probes=chosen,
            thresholds=thresholds,
            blocked_terms=providers.chat_data().blocked_terms(),
            batch_size=PROBE_BATCH * 4,
        )
    except Exception as exc:  # a probe must never take a training run down with it
        log.exception("Bias probe of %s failed", version.label)
        return _report_finish(
            report,
            status=BiasReport.Status.ERROR,
            error=f"{type(exc).__name__}: {exc}",
            settings=recorded,
            started=started,
        )
    return _report_finish(
        report,
        status=found.status,
        failures=list(found.failures),
        report=found.to_dict(),
        settings=recorded,
        started=started,
    )


def bias_report_start(*, version: ModelVersion, trigger: str) -> BiasReport:
    """Record that a probe of ``version`` is under way (its gate waits for the result)."""
    return BiasReport.objects.create(version=version, status=BiasReport.Status.RUNNING, trigger=trigger)


def _report_finish(row: BiasReport, /, *, started: float, **fields: Any) -> BiasReport:
    fields["duration_s"] = time.monotonic() - started
    for name, value in fields.items():
        setattr(row, name, value)
    row.save(update_fields=list(fields))
    return row
