"""Production settings refuse to start without secrets and pass Django's deploy checks."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

STRONG_KEY = "x9Jq3vT7mZ2pL8wR4nB6cY1kH5sD0fG-aE7uI2oP9lK3jM6hN8bV4cX1zQ5wT0rY"


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )


def test_production_without_secret_key_refuses_to_start():
    result = run_manage("check", DJANGO_ENV="production", DJANGO_ALLOWED_HOSTS="support.example.com")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr


def test_production_without_allowed_hosts_refuses_to_start():
    result = run_manage("check", DJANGO_ENV="production", DJANGO_SECRET_KEY=STRONG_KEY)
    assert result.returncode != 0
    assert "DJANGO_ALLOWED_HOSTS is not set" in result.stderr


def test_production_with_secrets_passes_deploy_checks_without_warnings():
    result = run_manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_ENV="production",
        DJANGO_SECRET_KEY=STRONG_KEY,
        DJANGO_ALLOWED_HOSTS="support.example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_development_deploy_check_does_warn():
    """The same check fails on the development defaults, so the test above can fail."""
    result = run_manage("check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0


def test_a_connection_pool_needs_postgresql_and_no_persistent_connections():
    sqlite = run_manage("check", DJANGO_DB_POOL="1", DATABASE_URL="")
    assert sqlite.returncode != 0
    assert "DJANGO_DB_POOL=1 needs PostgreSQL" in sqlite.stderr
    persistent = run_manage(
        "check",
        DJANGO_DB_POOL="1",
        DJANGO_CONN_MAX_AGE="60",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres",
    )
    assert persistent.returncode != 0
    assert "unset DJANGO_CONN_MAX_AGE" in persistent.stderr


def test_a_negative_monitoring_refresh_interval_is_refused():
    result = run_manage("check", SUPPORTBOT_MONITORING_REFRESH_S="-1")
    assert result.returncode != 0
    assert "SUPPORTBOT_MONITORING_REFRESH_S must be 0 (off)" in result.stderr
