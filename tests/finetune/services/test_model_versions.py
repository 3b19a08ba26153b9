"""Promotion and rollback without training: which versions may serve, and the audit trail."""

from __future__ import annotations

import pytest

from finetune.models import ModelVersion, ModelVersionEvent
from finetune.services.model_versions import model_version_promote, model_version_restorable, model_version_rollback
from supportbot.errors import ApplicationError
from tests.factories import ModelVersionFactory, UserFactory
from tests.finetune.fixtures import version_with_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("model_gates_advisory")]


def test_rollback_restores_any_version_that_served(tmp_path):
    measured = {"eval_loss": 1.0, "validation_fingerprint": "same-set"}
    v1 = version_with_files(tmp_path, metrics=measured)
    v2 = version_with_files(tmp_path, metrics=measured)
    v3 = version_with_files(tmp_path)  # never evaluated: fails the gate
    model_version_promote(version=v1)
    model_version_promote(version=v2)  # equal loss on the same set passes
    with pytest.raises(ApplicationError, match="no validation loss.*give a reason"):
        model_version_promote(version=v3)
    model_version_rollback(to_version=v1)
    assert ModelVersion.objects.get(status="active") == v1

    with pytest.raises(ApplicationError, match="never served customers"):
        model_version_rollback(to_version=v3)
    with pytest.raises(ApplicationError, match="already the active version"):
        model_version_rollback(to_version=ModelVersion.objects.get(status="active"))


def test_rollback_without_an_earlier_version_is_refused(tmp_path):
    with pytest.raises(ApplicationError, match="No version is active"):
        model_version_rollback()
    v1 = version_with_files(tmp_path, metrics={"eval_loss": 1.0})
    model_version_promote(version=v1)
    with pytest.raises(ApplicationError, match="no earlier one to roll back to"):
        model_version_rollback()


def test_promotion_refuses_a_version_whose_files_are_gone(tmp_path):
    version = ModelVersionFactory(metrics={"eval_loss": 1.0}, adapter_path=str(tmp_path / "gone"))
    with pytest.raises(ApplicationError, match="files of v.* are missing"):
        model_version_promote(version=version)
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.CANDIDATE


def test_rollback_to_a_chosen_earlier_version(tmp_path):
    versions = [version_with_files(tmp_path, metrics={"eval_loss": 1.0}) for _ in range(3)]
    admin = UserFactory()
    model_version_promote(version=versions[0])
    for version in versions[1:]:
        model_version_promote(version=version, actor=admin, reason="manual")
    model_version_rollback(actor=admin, to_version=versions[0], reason="v3 and v2 misbehave")
    states = {v.number: v.status for v in ModelVersion.objects.all()}
    assert states == {versions[0].number: "active", versions[1].number: "retired", versions[2].number: "retired"}
    event = ModelVersionEvent.objects.filter(action="rolled_back").get()
    assert event.reason == "v3 and v2 misbehave"
    assert event.previous == versions[2]


def test_only_a_version_that_served_and_does_not_now_can_be_restored(tmp_path):
    """The admin offers "Restore" exactly where model_version_rollback would accept it."""
    measured = {"eval_loss": 1.0, "validation_fingerprint": "same-set"}
    v1 = version_with_files(tmp_path, metrics=measured)
    v2 = version_with_files(tmp_path, metrics=measured)
    candidate = version_with_files(tmp_path)
    model_version_promote(version=v1)
    model_version_promote(version=v2)
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert [model_version_restorable(v) for v in (v1, v2, candidate)] == [True, False, False]
    for version in (v2, candidate):
        with pytest.raises(ApplicationError):
            model_version_rollback(to_version=version)
    assert model_version_rollback(to_version=v1) == v1
