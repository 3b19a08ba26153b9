"""The entry points set ``OMP_WAIT_POLICY=PASSIVE`` before torch starts its thread pool.

Spinning OpenMP threads triple the CPU time of the same work when another process
shares the cores (docs/quality-research.md); the variable is read once, when torch
first starts its pool, so it must be in the environment before ``import torch``.
Each entry point is started in a fresh interpreter, as a server or worker would be.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENTRY_POINTS = {
    # What each process imports first; then torch is imported and the policy read back.
    "manage.py": (
        "import runpy, sys; sys.argv = ['manage.py', 'version']; runpy.run_path('manage.py', run_name='__main__')"
    ),
    "celery": "import supportbot.celery",
    "asgi": "import supportbot.asgi",
}
PROBE = "; import os, torch; print('\\nPOLICY=' + os.environ.get('OMP_WAIT_POLICY', ''))"


def _policy(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environment.update(PYTHONPATH=str(ROOT), DJANGO_SETTINGS_MODULE="supportbot.settings", **env)
    environment.setdefault("SUPPORTBOT_PRELOAD_MODEL", "0")
    out = subprocess.run(
        [sys.executable, "-c", code + PROBE], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rsplit("POLICY=", 1)[1].strip()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_each_entry_point_makes_openmp_threads_wait_passively(entry):
    assert _policy(ENTRY_POINTS[entry]) == "PASSIVE"


def test_an_explicit_setting_is_kept():
    assert _policy(ENTRY_POINTS["celery"], OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
