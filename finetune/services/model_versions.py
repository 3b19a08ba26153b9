"""The model registry: which trained version serves customers, and how that changes.

- ``model_version_promote``: make a candidate active; the gates (``gates``) run against
  the version active now, and a failed gate needs a person's reason, recorded with
  their name.
- ``model_version_rollback``: restore a version that served before (by default the one
  active before the current one); ``model_version_restorable`` says which can be.

Each is one transaction; after commit, running chat servers are told to reload through
the channel layer (group ``MODEL_EVENTS_GROUP``, event ``MODEL_CHANGED_EVENT``).

With ``SUPPORTBOT_ENGINE=vllm`` a version goes live only once every vLLM server lists
its name (``supportbot-v<N>``): a promotion loads its adapter where missing, and a
server that cannot serve it refuses the promotion (or rollback) with what to do
(``finetune.serving.vllm``). A rollback to a name the servers still list loads nothing.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetune import selectors
from finetune.models import ModelVersion, ModelVersionEvent
from supportbot.db import advisory_lock
from supportbot.errors import ApplicationError

from .gates import gate_failures_text, model_version_gates_evaluate

log = logging.getLogger(__name__)

# Chat servers join this channel-layer group and reload their model on this event.
MODEL_EVENTS_GROUP = "models"
MODEL_CHANGED_EVENT = "model.changed"
# Held while the set of versions or the active one changes (promotion, rollback, a new candidate).
MODEL_VERSIONS_LOCK = "model-versions"


def _require_files(version: ModelVersion) -> None:
    path = version.merged_path or version.adapter_path
    if not path or not Path(path).is_dir():
        raise ApplicationError(
            f"The files of {version.label} are missing ({path or 'no path recorded'}); it cannot serve customers. "
            "Retrain to create a new version.",
            code="version_files_missing",
        )


def _serving_prepare(version: ModelVersion) -> None:
    """With vLLM: make ``version``'s name live on every server, or refuse with what is wrong."""
    if settings.SUPPORTBOT_ENGINE != "vllm":
        return
    from finetune.serving.runtime import vllm_servers
    from finetune.serving.vllm import VLLMError, served_version

    served = served_version(label=version.label, adapter_path=version.adapter_path, merged_path=version.merged_path)
    try:
        vllm_servers().publish(served)
    except VLLMError as exc:
        raise ApplicationError(str(exc), code="vllm_not_serving") from exc


def _activate(
    version: ModelVersion,
    *,
    previous: ModelVersion | None,
    action: str,
    actor=None,
    automatic: bool = False,
    gates_overridden: bool = False,
    reason: str = "",
    gate_results: dict[str, Any] | None = None,
) -> ModelVersion:
    now = timezone.now()
    actor = actor if getattr(actor, "pk", None) else None
    if previous is not None:
        # Retire first: the one-active constraint is checked row by row.
        previous.status = ModelVersion.Status.RETIRED
        previous.retired_at = now
        previous.save(update_fields=["status", "retired_at"])
        ModelVersionEvent.objects.create(
            version=previous,
            action=ModelVersionEvent.Action.RETIRED,
            actor=actor,
            automatic=automatic,
            reason=f"Replaced by {version.label}",
        )
    version.status = ModelVersion.Status.ACTIVE
    version.promoted_at = now
    version.promoted_by = actor
    version.retired_at = None
    version.save(update_fields=["status", "promoted_at", "promoted_by", "retired_at"])
    ModelVersionEvent.objects.create(
        version=version,
        action=action,
        previous=previous,
        actor=actor,
        automatic=automatic,
        gates_overridden=gates_overridden,
        reason=reason,
        gate_results=gate_results or {},
    )
    transaction.on_commit(partial(model_changed_broadcast, version_id=version.pk, action=action))
    return version


@transaction.atomic
def model_version_promote_first(*, version: ModelVersion, reason: str) -> ModelVersion | None:
    """Promote ``version`` with ``reason`` only when no version is active (a fresh install's first).

    The gates still run and are shown; a failing one is overridden with ``reason``,
    recorded as a person's promote-anyway is. Returns None, changing nothing, when a
    version is active or ``version`` is no longer a candidate: then the gates hold.
    """
    advisory_lock(MODEL_VERSIONS_LOCK)
    if selectors.model_version_active(for_update=True) is not None:
        return None
    version.refresh_from_db()
    if version.status != ModelVersion.Status.CANDIDATE:
        return None
    return model_version_promote(version=version, reason=reason)


@transaction.atomic
def model_version_promote(
    *, version: ModelVersion, actor=None, reason: str = "", automatic: bool = False
) -> ModelVersion:
    """Make ``version`` the one serving customers.

    The gates run against the version active now. If one fails, an automatic
    promotion is refused; a person may promote anyway by giving a reason, which is
    recorded with their name (``gates_overridden``).
    """
    advisory_lock(MODEL_VERSIONS_LOCK)
    version = ModelVersion.objects.select_for_update().get(pk=version.pk)
    if version.status == ModelVersion.Status.ACTIVE:
        raise _already_active(version)
    _require_files(version)
    active = selectors.model_version_active(for_update=True)
    gates = model_version_gates_evaluate(version=version, active=active)
    overridden = False
    if not gates["passed"]:
        if automatic:
            raise ApplicationError(
                f"{version.label} was not promoted automatically: {gate_failures_text(gates)}", code="gates_failed"
            )
        if not reason.strip():
            raise ApplicationError(
                f"{version.label} {gate_failures_text(gates)}. To promote it anyway, give a reason: it is recorded "
                "with your name.",
                code="gates_failed",
                extra={"gates": gates},
            )
        overridden = True
    _serving_prepare(version)
    return _activate(
        version,
        previous=active,
        action=ModelVersionEvent.Action.PROMOTED,
        actor=actor,
        automatic=automatic,
        gates_overridden=overridden,
        reason=reason.strip(),
        gate_results=gates,
    )


@transaction.atomic
def model_version_rollback(*, actor=None, to_version: ModelVersion | None = None, reason: str = "") -> ModelVersion:
    """Restore an earlier version: by default the one that was active before the current one.

    Any version that has served before can be restored; the gates do not apply,
    since it was already vetted when it first went live.
    """
    advisory_lock(MODEL_VERSIONS_LOCK)
    active = selectors.model_version_active(for_update=True)
    if to_version is None:
        if active is None:
            raise ApplicationError("No version is active, so there is nothing to roll back from.", code="no_active")
        last = (
            active.events.filter(
                action__in=[ModelVersionEvent.Action.PROMOTED, ModelVersionEvent.Action.ROLLED_BACK],
                previous__isnull=False,
            )
            .select_related("previous")
            .order_by("-created_at", "-id")
            .first()
        )
        target = last.previous if last is not None else None
        if target is None:
            target = (
                ModelVersion.objects.filter(status=ModelVersion.Status.RETIRED, promoted_at__isnull=False)
                .order_by("-retired_at", "-number")
                .first()
            )
        if target is None:
            raise ApplicationError(
                f"{active.label} is the first version that served; there is no earlier one to roll back to.",
                code="no_previous",
            )
    else:
        target = to_version
    target = ModelVersion.objects.select_for_update().get(pk=target.pk)
    refusal = _restore_refusal(target)
    if refusal is not None:
        raise refusal
    _require_files(target)
    _serving_prepare(target)
    return _activate(
        target,
        previous=active,
        action=ModelVersionEvent.Action.ROLLED_BACK,
        actor=actor,
        reason=reason.strip() or (f"Rolled back from {active.label}" if active else "Restored"),
    )


def model_version_restorable(version: ModelVersion) -> bool:
    """Whether a rollback can make ``version`` active again (it served before and does not now)."""
    return _restore_refusal(version) is None


def _restore_refusal(version: ModelVersion) -> ApplicationError | None:
    if version.status == ModelVersion.Status.ACTIVE:
        return _already_active(version)
    if version.promoted_at is None:
        return ApplicationError(
            f"{version.label} has never served customers, so it cannot be rolled back to; promote it instead "
            "(the gates apply).",
            code="never_active",
        )
    return None


def _already_active(version: ModelVersion) -> ApplicationError:
    return ApplicationError(f"{version.label} is already the active version.", code="already_active")


def model_changed_broadcast(*, version_id: int, action: str) -> None:
    """Tell running chat servers that the active version changed (they reload it).

    Runs after commit. Delivery is best-effort (channel layers drop messages); the
    database stays the source of truth, so a server that missed it can still read
    the active version there.
    """
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    version = ModelVersion.objects.filter(pk=version_id).first()
    layer = get_channel_layer()
    if version is None or layer is None:
        return
    message = {
        "type": MODEL_CHANGED_EVENT,
        "action": action,
        "version_id": version.pk,
        "label": version.label,
        "status": version.status,
        "base_model": version.base_model,
        "merged_path": version.merged_path,
        "adapter_path": version.adapter_path,
    }
    try:
        async_to_sync(layer.group_send)(MODEL_EVENTS_GROUP, message)
    except Exception:  # the promotion has committed; a lost notice must not turn it into an error
        log.exception("Could not tell chat servers that %s is now %s", version.label, version.status)
