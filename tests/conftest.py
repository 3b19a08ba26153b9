"""Shared fixtures: real services, real worker and server processes, factories.

Tests that need PostgreSQL, Redis or Chromium ask for the ``postgres``,
``redis_url`` or ``chromium`` fixtures. Without the service they are skipped with
the reason; with ``SUPPORTBOT_REQUIRE_SERVICES=1`` (CI) they fail instead.

Processes started by fixtures (a Celery worker, daphne) use the test database:
their ``DATABASE_URL`` points at it, so such tests use ``transactional_db`` (data
committed, visible to the other process).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVICES = os.environ.get("SUPPORTBOT_REQUIRE_SERVICES", "") in {"1", "true", "yes", "on"}


def need(condition: bool, reason: str) -> None:
    """Skip (laptop) or fail (CI) when a real service a test needs is missing."""
    if condition:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (SUPPORTBOT_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"Nothing listened on port {port} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- real services -------------------------------------------------------------------


@pytest.fixture
def postgres() -> None:
    need(connection.vendor == "postgresql", "PostgreSQL is not configured (set DATABASE_URL=postgres://...)")


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_url() -> str:
    url = settings.REDIS_URL
    need(bool(url), "Redis is not configured (set REDIS_URL=redis://...)")
    need(_redis_reachable(url), f"Redis at {url} does not answer")
    return url


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def chromium(chromium_paths):
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver)."""
    driver = _chromium_driver(chromium_paths)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def chromium_factory(chromium_paths):
    """``start() -> driver``: as many separate headless browsers as a test needs (a customer and an agent)."""
    drivers = []

    def start():
        drivers.append(_chromium_driver(chromium_paths))
        return drivers[-1]

    try:
        yield start
    finally:
        for driver in drivers:
            driver.quit()


def _chromium_driver(chromium_paths):
    need(
        chromium_paths is not None, "Chromium and chromedriver are not installed (apt install chromium chromium-driver)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium_paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    return driver


# --- processes on the test database --------------------------------------------------


def child_process_env(**extra: str) -> dict[str, str]:
    """Environment for a child process (worker, daphne) that must share the test database."""
    env = dict(os.environ)
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        user = db.get("USER") or ""
        auth = f"{user}:{db.get('PASSWORD') or ''}@" if user else ""
        env["DATABASE_URL"] = f"postgres://{auth}{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}/{db['NAME']}"
    elif connection.vendor == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{Path(db['NAME']).resolve()}"
    env["DJANGO_SETTINGS_MODULE"] = "supportbot.settings"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def celery_worker_command(queue: str, name: str) -> list[str]:
    """A solo-pool worker consuming only ``queue`` (no gossip: tests start and stop many)."""
    return [
        sys.executable, "-m", "celery", "-A", "supportbot", "worker", "--pool=solo", "-Q", queue,
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", name,
    ]  # fmt: skip


@pytest.fixture
def celery_worker_process(transactional_db, tmp_path) -> Iterator[str]:
    """A real ``celery worker`` process on the test database, on a queue of its own.

    Yields the queue name; ``task.apply_async(queue=...)`` sends work to it.
    """
    from supportbot.celery import app

    queue = f"test-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    process = subprocess.Popen(
        celery_worker_command(queue, f"{queue}@%h"),
        cwd=ROOT,
        env=child_process_env(SUPPORTBOT_CELERY_QUEUE=queue),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Celery worker exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if "ready." in log.read_text():
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"Celery worker not ready after 60 s:\n{log.read_text()[-3000:]}")
        process.log_path = log  # type: ignore[attr-defined]
        yield queue
    finally:
        stop_process(process)
        app.control  # noqa: B018 - keep the app imported for the fixture's lifetime


@pytest.fixture
def daphne_factory(transactional_db, tmp_path) -> Iterator:
    """Start real daphne processes on the test database: ``start(**env) -> base URL``.

    Each call starts one more process (with extra environment variables, e.g.
    settings); all are stopped after the test. With REDIS_URL set they share the
    Redis channel layer, as several production processes do.
    """
    processes: list[subprocess.Popen] = []

    def start(**env: str) -> str:
        port = free_port()
        log = tmp_path / f"daphne-{port}.log"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "--websocket-max-message-size",
                "65536",
                "supportbot.asgi:application",
            ],
            cwd=ROOT,
            env=child_process_env(**env),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        process.log_path = log  # type: ignore[attr-defined]
        wait_for_port(port, process, log)
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for process in processes:
            stop_process(process)


@pytest.fixture
def daphne_server(daphne_factory) -> str:
    """A real daphne process serving the project on a free port; yields its base URL."""
    return daphne_factory()


@pytest.fixture(scope="session")
def bitext_csv() -> Path:
    """The shared Bitext sample of 3,651 real support exchanges (not shipped with the project)."""
    candidates = [
        Path(os.environ.get("SUPPORTBOT_BITEXT_CSV", "/nonexistent")),
        ROOT.parent / "shared" / "data" / "bitext" / "customer_support_tickets.csv",
        Path("/work/shared/data/bitext/customer_support_tickets.csv"),
    ]
    found = next((path for path in candidates if path.is_file()), None)
    need(found is not None, "The Bitext sample is not available (set SUPPORTBOT_BITEXT_CSV)")
    return found
