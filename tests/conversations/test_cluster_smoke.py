"""scripts/cluster_smoke.py, the check of a running cluster, against two real daphne processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_process_env, free_port
from tests.conversations.test_real_server import SERVER_ENV

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _smoke(*bases: str) -> tuple[int, list[dict]]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cluster_smoke.py"), *bases, "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=child_process_env(),
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, lines


def test_each_web_process_is_checked_and_a_dead_one_fails_the_check(daphne_factory, served_model, redis_url):
    bases = [daphne_factory(**SERVER_ENV), daphne_factory(**SERVER_ENV)]

    code, lines = _smoke(*bases)
    assert code == 0, lines
    assert [line["web"] for line in lines] == bases
    for line in lines:
        assert (line["healthz"], line["status"], line["model_version"]) == (200, "complete", served_model.label)
        assert line["token_frames"] > 1
        assert line["streamed_equals_saved"] is True

    dead = f"http://127.0.0.1:{free_port()}"
    code, lines = _smoke(bases[0], dead)
    assert code == 1
    assert lines[0]["status"] == "complete"
    assert (lines[1]["web"], lines[1]["healthz"], lines[1]["status"]) == (dead, 0, "unreachable")
    assert "ConnectionRefused" in lines[1]["error"] or "Connection refused" in lines[1]["error"]
