"""The test suite's own fixtures: what a skipped service test tells the person running ``make test``."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, need, port_answers, redis_answers

SERVICE_TEST = "tests/supportbot/test_real_services.py::test_orm_round_trip_on_postgres"


def test_a_skip_names_the_command_when_the_local_services_answer(tmp_path):
    """``make test`` with no URLs set, on a machine where PostgreSQL and Redis run on their usual ports."""
    need(
        port_answers("127.0.0.1", 5432) and redis_answers("redis://127.0.0.1:6379/0"),
        "PostgreSQL and Redis do not answer on 127.0.0.1:5432 and :6379",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "SUPPORTBOT_REQUIRE_SERVICES", "PYTEST_ADDOPTS"}
    }
    env["SUPPORTBOT_VAR_DIR"] = str(tmp_path)  # its own SQLite test database
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", SERVICE_TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout + result.stderr
    assert "1 skipped" in out, out
    assert "PostgreSQL answers on 127.0.0.1:5432" in out, out
    command = "DATABASE_URL=postgres://postgres@127.0.0.1:5432/supportbot REDIS_URL=redis://127.0.0.1:6379/15 make test"
    assert command in out, out
