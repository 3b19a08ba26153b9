"""Shared fixtures: real services, real worker and server processes, factories.

Tests that need PostgreSQL, Redis or Chromium ask for the ``postgres``,
``redis_url`` or ``chromium`` fixtures. Without the service they are skipped with
the reason; with ``SUPPORTBOT_REQUIRE_SERVICES=1`` (CI) they fail instead.

Processes started by fixtures (a Celery worker, daphne) use the test database:
their ``DATABASE_URL`` points at it, so such tests use ``transactional_db`` (data
committed, visible to the other process).
"""

from __future__ import annotations

import functools
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


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


# The URLs ``make test`` is told to use when the services run on their usual local ports.
# Redis db 15, the last of the default 16, keeps test keys apart from an app's db 0.
LOCAL_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/supportbot"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/15"


@functools.cache
def local_services_hint() -> str:
    """When PostgreSQL or Redis answers on its usual local port but is not configured: how to use it.

    Empty when neither answers (or both are configured). A PostgreSQL that does not
    let the ``postgres`` user in gets placeholders for its user and password.
    """
    found, urls = [], []
    if not os.environ.get("DATABASE_URL") and port_answers("127.0.0.1", 5432):
        found.append("PostgreSQL answers on 127.0.0.1:5432")
        url = LOCAL_DATABASE_URL
        try:
            import psycopg

            psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2).close()
        except psycopg.Error:
            url = url.replace("postgres@", "USER:PASSWORD@")
        urls.append(f"DATABASE_URL={url}")
    if not os.environ.get("REDIS_URL") and redis_answers(LOCAL_REDIS_URL):
        found.append("Redis answers on 127.0.0.1:6379")
        urls.append(f"REDIS_URL={LOCAL_REDIS_URL}")
    if not found:
        return ""
    unused = "they are not used" if len(found) > 1 else "it is not used"
    return f"; {' and '.join(found)}, but {unused}: run {' '.join(urls)} make test"


def need_service(condition: bool, reason: str) -> None:
    """``need`` for PostgreSQL and Redis: the skip says how to run the test where they answer locally."""
    need(condition, reason + ("" if condition else local_services_hint()))


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
    need_service(connection.vendor == "postgresql", "PostgreSQL is not configured (set DATABASE_URL=postgres://...)")


@pytest.fixture
def redis_url() -> str:
    url = settings.REDIS_URL
    need_service(bool(url), "Redis is not configured (set REDIS_URL=redis://...)")
    need(redis_answers(url), f"Redis at {url} does not answer")
    return url


def pytest_report_header(config) -> str | None:
    hint = local_services_hint()
    return "supportbot: PostgreSQL/Redis tests will be skipped" + hint if hint else None


class RedisServer:
    """A throwaway ``redis-server`` of a test's own, on a free port, that the test may stop and restart.

    No persistence: a restart loses every key, as a crashed Redis without a snapshot
    does (group memberships included).
    """

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not redis_answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """Stop it the hard way (SIGKILL), as a crash does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A running throwaway Redis server (never the shared one, which other tests and people use)."""
    need(shutil.which("redis-server") is not None, "redis-server is not installed (apt install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


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
    # Console messages of every frame, for tests that check the page logs no warnings.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    return driver


# --- processes on the test database --------------------------------------------------


# Training runs probe their new version for bias; in tests a tiny model answers 20 requests
# (the fewest that give a verdict) in 23 variants, 16 tokens each, instead of 54 x 64 tokens.
SMALL_BIAS_PROBES = {"SUPPORTBOT_BIAS_PROBE_REQUESTS": "20", "SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS": "16"}


@pytest.fixture(autouse=True)
def _empty_django_cache():
    """Each test starts with an empty Django cache: monitoring figures another test kept (in the
    shared Redis, where daphne processes read them too) would be served for
    SUPPORTBOT_MONITORING_CACHE_S. With Redis this deletes only the cache's own keys
    (supportbot/cache.py), never the channel layer's or the broker's."""
    import redis
    from django.core.cache import cache

    try:
        cache.clear()
    except redis.RedisError:  # Redis down: the tests that need it say so themselves
        pass


@pytest.fixture(autouse=True)
def _small_bias_probes(settings):
    for name, value in SMALL_BIAS_PROBES.items():
        setattr(settings, name, int(value))


@pytest.fixture(autouse=True)
def _bias_gate_advisory(request, settings):
    """The ``bias_probe`` promotion gate is shown but does not block, except in tests marked ``bias_gate``.

    Versions made by factories were never probed, and a tiny model's probe verdict says
    nothing; tests of other gates and of the promotion flow would all need a report.
    tests/finetune/services/test_bias.py tests the gate itself. Workers started by
    ``training_worker`` inherit the setting.
    """
    if request.node.get_closest_marker("bias_gate") is None:
        settings.SUPPORTBOT_GATES_ADVISORY = [*settings.SUPPORTBOT_GATES_ADVISORY, "bias_probe"]


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
    env.update(SMALL_BIAS_PROBES)
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
        deadline = time.monotonic() + 180  # a loaded machine starts a worker slowly
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Celery worker exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if "ready." in log.read_text():
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"Celery worker not ready after 180 s:\n{log.read_text()[-3000:]}")
        process.log_path = log  # type: ignore[attr-defined]
        yield queue
    finally:
        stop_process(process)
        app.control  # noqa: B018 - keep the app imported for the fixture's lifetime


@pytest.fixture
def daphne_factory(transactional_db, tmp_path) -> Iterator:
    """Start real daphne processes on the test database: ``start(**env) -> base URL``.

    Each call starts one more process (with extra environment variables, e.g.
    settings; ``application=`` serves another ASGI app); all are stopped after the
    test. ``start.processes[base]`` is the process serving ``base``. With REDIS_URL set they share the
    Redis channel layer, as several production processes do.
    """
    processes: list[subprocess.Popen] = []

    def start(application: str = "supportbot.asgi:application", **env: str) -> str:
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
                application,
            ],
            cwd=ROOT,
            # A short drain on SIGTERM: the test is over, its replies need not finish.
            env=child_process_env(**{"SUPPORTBOT_SHUTDOWN_GRACE_S": "1", **env}),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        process.log_path = log  # type: ignore[attr-defined]
        wait_for_port(port, process, log)
        base = f"http://127.0.0.1:{port}"
        start.processes[base] = process
        return base

    start.processes = {}  # base URL -> its Popen (log at .log_path), to signal or read a server
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
