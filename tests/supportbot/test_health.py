"""/healthz reports the database, channel layer, Celery broker and active model."""

from __future__ import annotations

import pytest
from django.test import override_settings

from finetune.serving.runtime import engine_reset
from tests.factories import ModelVersionFactory

pytestmark = pytest.mark.django_db

DEAD_REDIS = "redis://127.0.0.1:1/0"


def test_healthz_green_on_configured_services(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert {"database", "channel_layer", "celery_broker", "model"} <= set(body["checks"])
    assert body["checks"]["model"]["active_version"] is None


def test_healthz_green_with_postgres_and_redis(client, postgres, redis_url):
    body = client.get("/healthz").json()
    assert body["checks"]["database"]["vendor"] == "postgresql"
    assert body["checks"]["database"]["pooled"] is False  # pools are for the ASGI server (DJANGO_DB_POOL=auto)
    assert body["checks"]["channel_layer"]["backend"] == "RedisChannelLayer"
    assert body["checks"]["celery_broker"]["transport"] == "redis"
    assert body["status"] == "ok"


def test_healthz_reports_active_model_version(client, settings):
    ModelVersionFactory(number=7, status="active", base_model="gpt2")
    engine_reset()  # this process serves nothing yet
    settings.SUPPORTBOT_PRELOAD_MODEL = False  # so the model loads on the first reply: that is fine
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["model"] == {
        "ok": True,
        "active_version": "v7",
        "base_model": "gpt2",
        "note": "Loads the active version on the first reply (SUPPORTBOT_PRELOAD_MODEL is off).",
        "this_process": {"serving": None, "loading": None, "error": None},
    }

    # A server that preloads and serves neither the active version nor is loading it is not ok.
    settings.SUPPORTBOT_PRELOAD_MODEL = True
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["model"]["ok"] is False
    assert "not the active v7" in body["checks"]["model"]["note"]


def test_healthz_503_when_redis_is_dead(client):
    with override_settings(
        CHANNEL_LAYERS={
            "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [DEAD_REDIS]}}
        },
        CELERY_BROKER_URL=DEAD_REDIS,
    ):
        response = client.get("/healthz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["channel_layer"]["ok"] is False
    assert checks["celery_broker"]["ok"] is False
    assert checks["database"]["ok"] is True


def test_healthz_tells_anonymous_callers_what_is_down_but_not_where(client, settings, django_user_model):
    dead = {
        "CHANNEL_LAYERS": {
            "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [DEAD_REDIS]}}
        },
        "CELERY_BROKER_URL": DEAD_REDIS,
    }
    with override_settings(**dead):
        anonymous = client.get("/healthz")
    assert anonymous.status_code == 503
    body = anonymous.content.decode()
    assert "127.0.0.1" not in body
    assert ":1" not in body
    checks = anonymous.json()["checks"]
    assert checks["channel_layer"]["ok"] is False
    assert "staff" in checks["celery_broker"]["error"].lower()  # where to look for the details

    # Staff, or a deployment that says so, see the details.
    client.force_login(django_user_model.objects.create_user("ops", is_staff=True))
    with override_settings(**dead):
        assert "127.0.0.1:1" in client.get("/healthz").content.decode()
    client.logout()
    with override_settings(**dead, SUPPORTBOT_HEALTHZ_DETAILS=True):
        assert "127.0.0.1:1" in client.get("/healthz").content.decode()
