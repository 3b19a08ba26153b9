"""Django settings for SupportBot, read from the environment.

With nothing set, everything runs on a laptop with no services: a SQLite file,
the in-memory channel layer and a Celery broker kept in files under ``var/``.
``DATABASE_URL`` switches to PostgreSQL (psycopg 3) and ``REDIS_URL`` switches
the channel layer and the Celery broker and result backend to Redis.
``DJANGO_ENV=production`` requires ``DJANGO_SECRET_KEY`` and
``DJANGO_ALLOWED_HOSTS`` and turns on the deployment hardening.
The README's settings table lists every variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
# Everything the app writes at run time (SQLite file, broker files, datasets, models).
VAR_DIR = Path(os.environ.get("SUPPORTBOT_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean; use 1/0, true/false, yes/no or on/off.")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DJANGO_ENV = os.environ.get("DJANGO_ENV", "development").strip().lower()
if DJANGO_ENV not in {"development", "test", "production"}:
    raise ImproperlyConfigured(f"DJANGO_ENV={DJANGO_ENV!r}; use development, test or production.")
IS_PRODUCTION = DJANGO_ENV == "production"

if IS_PRODUCTION:
    SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
    if not SECRET_KEY:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Production refuses to start without a secret key; "
            'generate one with: python -c "import secrets; print(secrets.token_urlsafe(50))"'
        )
    ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", [])
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured(
            "DJANGO_ALLOWED_HOSTS is not set. Production needs the host names it serves, "
            "comma-separated (e.g. DJANGO_ALLOWED_HOSTS=support.example.com)."
        )
else:
    # A fixed development key: never used in production, where the branch above applies.
    SECRET_KEY = os.environ.get(  # noqa: S105
        "DJANGO_SECRET_KEY", "dev-only-insecure-key-6f1c0a0e6b9b4c7f8d2e1a3b5c7d9e0f-supportbot"
    )
    ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])

DEBUG = env_bool("DJANGO_DEBUG", not IS_PRODUCTION)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",  # must come first: its runserver serves ASGI and websockets
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "supportbot",
    "finetune",
    "conversations",
    "workspace",
]

MIDDLEWARE = [
    # First: the widget's panel explains a refused host before anything else checks it.
    "conversations.middleware.embed_host_check",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "supportbot.urls"
ASGI_APPLICATION = "supportbot.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DJANGO_CONN_MAX_AGE", 0))}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "supportbot.sqlite3",
            # IMMEDIATE: a transaction takes the write lock when it begins, so a writer waits
            # (up to the timeout) instead of failing with "database is locked" when two
            # connections (a training worker's progress and heartbeat threads, daphne) write at once.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
            # A file, not :memory:, so a Celery worker or daphne started by a test
            # sees the same test database.
            "TEST": {"NAME": str(VAR_DIR / "test-supportbot.sqlite3")},
        }
    }
# A psycopg connection pool per process (PostgreSQL only). Without it every database
# call of the chat opens a new connection (Channels closes it after each call when
# CONN_MAX_AGE is 0, and persistent connections are unsafe under ASGI); with it, 50
# simultaneous chats got their first word in half the time (docs/benchmarks.md).
# "auto" (default): on in the ASGI server (supportbot/asgi.py marks its process) when the
# database is PostgreSQL, off elsewhere: a Celery worker that forks (prefork) must not
# inherit a pool. "1" forces it on (PostgreSQL only), "0" off.
_postgres = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
if os.environ.get("DJANGO_DB_POOL", "auto").strip().lower() == "auto":
    DB_POOL_ON = (
        _postgres and os.environ.get("SUPPORTBOT_PROCESS") == "asgi" and not DATABASES["default"].get("CONN_MAX_AGE")
    )
else:
    DB_POOL_ON = env_bool("DJANGO_DB_POOL", False)
    if DB_POOL_ON and not _postgres:
        raise ImproperlyConfigured("DJANGO_DB_POOL=1 needs PostgreSQL (DATABASE_URL=postgres://...).")
    if DB_POOL_ON and DATABASES["default"].get("CONN_MAX_AGE"):
        raise ImproperlyConfigured(
            "DJANGO_DB_POOL=1 replaces persistent connections: unset DJANGO_CONN_MAX_AGE (or set it to 0)."
        )
if DB_POOL_ON:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("DJANGO_DB_POOL_MAX_SIZE", 8),
        "timeout": 10,  # seconds a call waits for a free connection before failing
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channel layer and Celery ------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
# Redis connections per process for the channel layer (and as many for the rate limit):
# a command waits for a free one rather than failing when all are busy.
SUPPORTBOT_REDIS_POOL_SIZE = env_int("SUPPORTBOT_REDIS_POOL_SIZE", 64)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis with bounded, waiting connection pools (supportbot/channel_layer.py).
            "BACKEND": "supportbot.channel_layer.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 reads with a 5 s socket timeout by default, the same as
                # channels-redis's 5 s blocking BZPOPMIN: an idle socket's consumer then
                # dies with "Timeout reading from redis" after 5 s. Read longer than that.
                # A Redis that does not accept connections is an outage the layer waits out
                # (supportbot/channel_layer.py); 5 s bounds each attempt to reach it.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5}],
                # Streaming pushes a frame per token; the default capacity of 100
                # drops frames for a busy conversation group.
                "capacity": env_int("SUPPORTBOT_CHANNEL_CAPACITY", 1500),
                "expiry": 60,
                "pool_size": SUPPORTBOT_REDIS_POOL_SIZE,
                "pool_timeout": 10,  # seconds a command waits for a free connection
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Training is the longest task. Redis redelivers an unacked task after the
# visibility timeout, so it must exceed the hard limit, which exceeds the soft one.
SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT = env_int("SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT", 3 * 3600)
SUPPORTBOT_TRAINING_TIME_LIMIT = env_int("SUPPORTBOT_TRAINING_TIME_LIMIT", SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT + 600)
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", SUPPORTBOT_TRAINING_TIME_LIMIT + 3600)
if not (CELERY_VISIBILITY_TIMEOUT > SUPPORTBOT_TRAINING_TIME_LIMIT > SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT):
    raise ImproperlyConfigured(
        "Celery time limits must satisfy CELERY_VISIBILITY_TIMEOUT > SUPPORTBOT_TRAINING_TIME_LIMIT > "
        "SUPPORTBOT_TRAINING_SOFT_TIME_LIMIT, or a long training run is delivered twice."
    )

# A training worker writes a heartbeat this often; a running run whose heartbeat is
# older than STALE_AFTER belongs to a dead worker and is failed by the reaper.
SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL = env_float("SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL", 5.0)
# 60 s: twelve missed heartbeats, and a killed run is failed within about a minute.
SUPPORTBOT_TRAINING_STALE_AFTER = env_float("SUPPORTBOT_TRAINING_STALE_AFTER", 60.0)
if SUPPORTBOT_TRAINING_STALE_AFTER < 3 * SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL:
    raise ImproperlyConfigured(
        "SUPPORTBOT_TRAINING_STALE_AFTER must be at least 3 x SUPPORTBOT_TRAINING_HEARTBEAT_INTERVAL, "
        "or a live run with one slow heartbeat is failed as dead."
    )
# Every worker looks for runs with a stale heartbeat this often (a thread beside the tasks).
SUPPORTBOT_TRAINING_REAP_INTERVAL_S = env_float("SUPPORTBOT_TRAINING_REAP_INTERVAL_S", 15.0)
# Queues (docs/deploy.md): training runs hours on a GPU box, so retrain tasks go to a queue
# of their own that only training workers consume (`celery worker -Q training -c 1`);
# everything else goes to the default queue, served by CPU workers, and never waits behind
# a training run. One worker may consume both (`-Q default,training`, as `make worker` does).
SUPPORTBOT_TRAINING_QUEUE = os.environ.get("SUPPORTBOT_TRAINING_QUEUE", "training")

CELERY_BROKER_DIR = VAR_DIR / "celery"
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
else:
    # kombu's filesystem transport: messages are files, so a worker in another
    # process picks them up with no broker server.
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
    }
    CELERY_RESULT_BACKEND = f"file://{CELERY_BROKER_DIR / 'results'}"
    for _folder in ("queue", "control", "results"):
        (CELERY_BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", CELERY_BROKER_URL)
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", CELERY_RESULT_BACKEND)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message reserved per worker process: a training worker must not hold a second run
# hostage for hours while it trains the first, and a default worker must not queue short
# tasks behind a long one it already took.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = "UTC"
# Tests give their worker a queue of its own, so a demo worker on the same broker cannot take their tasks.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SUPPORTBOT_CELERY_QUEUE", "default")
# Retrain tasks by name (finetune.services.training_runs.RETRAIN_TASK), also when sent
# without an explicit queue (e.g. from a shell with `send_task`).
CELERY_TASK_ROUTES = {"finetune.retrain": {"queue": SUPPORTBOT_TRAINING_QUEUE}} if SUPPORTBOT_TRAINING_QUEUE else {}

# --- Auth, i18n, static -----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/admin/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# Development serves files straight from static/; production serves the
# hashed, compressed copies that collectstatic writes.
WHITENOISE_USE_FINDERS = not IS_PRODUCTION
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if IS_PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# --- Security (production) ----------------------------------------------------
if IS_PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
    if env_bool("DJANGO_BEHIND_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- SupportBot -----------------------------------------------------------------
# Where built datasets and trained adapters are written.
SUPPORTBOT_DATASET_DIR = Path(os.environ.get("SUPPORTBOT_DATASET_DIR", VAR_DIR / "datasets"))
# Every process that trains or serves reads and writes versions here: with training and
# web processes (and vLLM servers) on several machines it must be one shared path (an NFS
# or similar mount at the same path everywhere), since versions are recorded by path.
SUPPORTBOT_MODEL_STORE = Path(os.environ.get("SUPPORTBOT_MODEL_STORE", VAR_DIR / "models"))
# "auto": gpt2 when cached or reachable, else the bundled SmolLM2-135M-Instruct.
SUPPORTBOT_BASE_MODEL = os.environ.get("SUPPORTBOT_BASE_MODEL", "auto")
# /healthz tells everyone what is down, but why (error texts naming hosts, ports, paths)
# only to staff; on: to everyone (a health checker on a private network).
SUPPORTBOT_HEALTHZ_DETAILS = env_bool("SUPPORTBOT_HEALTHZ_DETAILS", False)
# With this set, tests that need PostgreSQL, Redis or Chromium fail instead of skipping (CI).
SUPPORTBOT_REQUIRE_SERVICES = env_bool("SUPPORTBOT_REQUIRE_SERVICES", False)

# Reply quality gate (issue 10, finetune.services.gates): a candidate's served replies on
# its validation sample must beat the retrieval baseline (the nearest past answer) on
# ROUGE-L and on intent accuracy (or reach SUPPORTBOT_GATE_INTENT_ACCURACY), with no
# template slot and no repeated sentence, and may fall below the active version's by at
# most this margin on either (two intents in a 100-reply sample).
SUPPORTBOT_GATE_QUALITY_MARGIN = env_float("SUPPORTBOT_GATE_QUALITY_MARGIN", 0.02)
SUPPORTBOT_GATE_INTENT_ACCURACY = env_float("SUPPORTBOT_GATE_INTENT_ACCURACY", 0.95)
# Gates listed here are evaluated and shown but do not block automatic promotion (test set-ups
# whose tiny models cannot answer anything; never in production: a person then promotes by hand).
SUPPORTBOT_GATES_ADVISORY = env_list("SUPPORTBOT_GATES_ADVISORY", [])

# --- Chat (issue 5) -------------------------------------------------------------
# A bot reply whose mean token log-probability is below this hands the conversation
# to a human. A guessing model sits near -ln(vocabulary) (about -6 to -11); fluent,
# in-domain greedy replies of a fine-tuned model sit well above -2. Tune it from the
# agents' reviews (the workspace's low-confidence queue); -1000 turns the rule off.
SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD = env_float("SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD", -2.5)
# Words in a customer message that ask for a person (whole words, case-insensitive,
# plural accepted). "agent" and "human" are what customers actually type.
SUPPORTBOT_HANDOFF_KEYWORDS = env_list(
    "SUPPORTBOT_HANDOFF_KEYWORDS", ["agent", "human", "representative", "operator", "real person"]
)
# Longest customer message in characters: a support question fits; a pasted log
# does not belong in the prompt of a small model with a 1-2k token context.
SUPPORTBOT_MAX_MESSAGE_CHARS = env_int("SUPPORTBOT_MAX_MESSAGE_CHARS", 4096)
# Customer messages per minute per session, shared by all of its sockets (and all
# daphne processes when REDIS_URL is set). 20 is more than a person types.
SUPPORTBOT_RATE_LIMIT = env_int("SUPPORTBOT_RATE_LIMIT", 20)
# How long an anonymous chat token stays valid without the page being loaded again
# (it is renewed on every page load): the customer's history survives this long.
SUPPORTBOT_CHAT_TOKEN_MAX_AGE = env_int("SUPPORTBOT_CHAT_TOKEN_MAX_AGE", 30 * 24 * 3600)
# On SIGTERM a chat server stops accepting, lets running replies finish for this long,
# cuts off the rest (saved as failed; the next server answers again) and closes every
# socket with 1012 so widgets reconnect. 8 s fits Docker's default 10 s stop timeout.
SUPPORTBOT_SHUTDOWN_GRACE_S = env_float("SUPPORTBOT_SHUTDOWN_GRACE_S", 8.0)
# Pages allowed to frame the widget's chat panel (/chat/embed/), as CSP frame-ancestors
# sources. "*" lets the widget run on any site, as the embed snippet promises.
SUPPORTBOT_WIDGET_FRAME_ANCESTORS = env_list("SUPPORTBOT_WIDGET_FRAME_ANCESTORS", ["*"])

# --- Inference engine (finetune/serving/, finetune/serving/runtime.py) --------------------
# "batched" steps every running reply together over a shared KV cache (several times the
# throughput of "naive" under concurrent chats, see docs/benchmarks.md); "naive" runs one
# model.generate() at a time, the simple reference.
# "vllm" sends replies to the vLLM servers of SUPPORTBOT_VLLM_URLS (docs/deploy.md): past one
# machine, and on GPUs.
SUPPORTBOT_ENGINE = os.environ.get("SUPPORTBOT_ENGINE", "batched").strip().lower()
if SUPPORTBOT_ENGINE not in {"batched", "naive", "vllm"}:
    raise ImproperlyConfigured(f"SUPPORTBOT_ENGINE={SUPPORTBOT_ENGINE!r}; use batched, naive or vllm.")
# Base URLs of the OpenAI-compatible vLLM servers, comma-separated (http://gpu-1:8000,...).
# Every server serves every version; a conversation sticks to one (its prefix cache).
SUPPORTBOT_VLLM_URLS = env_list("SUPPORTBOT_VLLM_URLS", [])
if SUPPORTBOT_ENGINE == "vllm" and not SUPPORTBOT_VLLM_URLS:
    raise ImproperlyConfigured("SUPPORTBOT_ENGINE=vllm needs SUPPORTBOT_VLLM_URLS, the base URLs of the vLLM servers.")
# A vLLM server that sends nothing for this long during a reply is treated as dead. Under
# load a reply can queue on the server before its first token: keep it well above that.
SUPPORTBOT_VLLM_READ_TIMEOUT_S = env_float("SUPPORTBOT_VLLM_READ_TIMEOUT_S", 60.0)
# How long a promotion waits for a server to load an adapter (a few seconds for a LoRA).
SUPPORTBOT_VLLM_LOAD_TIMEOUT_S = env_float("SUPPORTBOT_VLLM_LOAD_TIMEOUT_S", 120.0)
# Load the active model version when the ASGI app starts (in a background thread), so the
# first customer after a restart does not wait seconds for the load. Off: load on first reply.
SUPPORTBOT_PRELOAD_MODEL = env_bool("SUPPORTBOT_PRELOAD_MODEL", True)
# Each chat server reads the active model version's id this often and reloads when it
# changed: the model.changed event cannot reach other processes on the in-memory channel
# layer (the default), and channel layers may drop it. One indexed query per process.
SUPPORTBOT_MODEL_CHECK_S = env_float("SUPPORTBOT_MODEL_CHECK_S", 5.0)
# A support reply of a few sentences; longer replies mostly ramble, and each token costs
# every other chat in the batch a step.
SUPPORTBOT_MAX_NEW_TOKENS = env_int("SUPPORTBOT_MAX_NEW_TOKENS", 160)
# Most tokens of a reply's prompt (system prompt, history, the customer's message): older
# turns are dropped first, then the message is cut in the middle with a note. 1536 holds a
# 4,096-character message of ordinary text whole; a message of emoji (several tokens each)
# is cut instead of costing every chat seconds of prefill.
SUPPORTBOT_PROMPT_MAX_TOKENS = env_int("SUPPORTBOT_PROMPT_MAX_TOKENS", 1536)
# Extra strings that end a reply, comma-separated, "\n" for a newline (the prompt template's
# own turn markers always stop it). E.g. a sign-off the model learnt from old tickets.
SUPPORTBOT_STOP_SEQUENCES = [s.replace("\\n", "\n") for s in env_list("SUPPORTBOT_STOP_SEQUENCES", [])]
# Wall-clock limit of one reply, queueing included: a customer should not wait longer
# than this for the bot; the reply ends with finish_reason "timeout".
SUPPORTBOT_GENERATION_TIMEOUT_S = env_float("SUPPORTBOT_GENERATION_TIMEOUT_S", 60.0)
# Replies decoded together. 16 keeps a GPT-2-small step near 100 ms on two cores
# (about 10 tokens/s per chat, faster than people read); more raise total throughput
# but slow every chat. Requests beyond it wait in the queue.
SUPPORTBOT_MAX_BATCH_SIZE = env_int("SUPPORTBOT_MAX_BATCH_SIZE", 16)
# int8 dynamic quantisation of the served model's linear layers (CPU only). Off: it about
# doubles decode speed but tripled SmolLM2's reply perplexity (docs/benchmarks.md); turn it
# on only for a model whose perplexity bench/bench_int8.py shows within a few percent.
SUPPORTBOT_INT8 = env_bool("SUPPORTBOT_INT8", False)
# Memory for keys/values of finished replies, so a conversation's next turn (and every
# shared system prompt) is not prefilled again. ~75 KB per token for GPT-2-small: 512 MB
# holds about 16 conversations of 400 tokens. 0 turns it off.
SUPPORTBOT_PREFIX_CACHE_MB = env_float("SUPPORTBOT_PREFIX_CACHE_MB", 512.0)
# Prompt tokens the batched engine prefills between two decode steps when it chunks a long
# prompt. A new customer no longer waits for the chunk in progress (a pass gives way to a
# newcomer between two layers: within 0.94-1.05x idle with chunks of 32, 128 or 256,
# docs/benchmarks.md#fairness), so this trades a long message's own prefill (1,535 tokens:
# ~5 s in chunks of 32, ~2.7 s in chunks of 256 on two CPU cores with SmolLM2-135M) against
# the smoothness of replies streaming meanwhile (a token per chunk and step: every ~0.18 s
# with 32, ~0.5 s with 256). A GPU takes far more (vLLM's default is 512 to 2048).
SUPPORTBOT_PREFILL_TOKENS_PER_STEP = env_int("SUPPORTBOT_PREFILL_TOKENS_PER_STEP", 32)
# A prompt first in line with at most this many tokens to prefill (after the prefix cache)
# is prefilled whole, in one pass: an ordinary grounded prompt (GroundingConfig's budget is
# 768 tokens) is never chunked, which would cost it a pass's fixed overhead per chunk. Only
# longer prompts (a customer's long message on a version without grounding, up to
# SUPPORTBOT_PROMPT_MAX_TOKENS) are chunked.
SUPPORTBOT_PREFILL_WHOLE_TOKENS = env_int("SUPPORTBOT_PREFILL_WHOLE_TOKENS", 768)

# --- Agent workspace (issue 11) ---------------------------------------------------------
# Share of finished bot replies put in the "random sample" review queue, so agents also
# see ordinary replies, not only the ones something flagged. 5% of a busy bot's replies
# is already more than a small team reviews; lower it when the queue never empties.
SUPPORTBOT_REVIEW_SAMPLE_SHARE = env_float("SUPPORTBOT_REVIEW_SAMPLE_SHARE", 0.05)
# Share of queued replies that two agents review independently, for the agreement
# figures (raw agreement, Cohen's kappa). 10% gives a kappa with a usable interval after
# a few hundred reviews without doubling the work.
SUPPORTBOT_DOUBLE_REVIEW_SHARE = env_float("SUPPORTBOT_DOUBLE_REVIEW_SHARE", 0.10)
# How long a claim on a queue entry lasts without activity; an agent who walks away
# gives the entry back to the queue after this. Ten minutes covers reading a long
# conversation and writing a correction; the page renews it while it is open.
SUPPORTBOT_REVIEW_LEASE_S = env_int("SUPPORTBOT_REVIEW_LEASE_S", 600)
# A bot reply whose mean token log-probability is below this goes to the "low
# confidence" queue. Above the handoff threshold (-2.5): replies not doubtful enough to
# hand the customer to a person, but worth a look.
SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD = env_float("SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD", -1.5)
for _name in ("SUPPORTBOT_REVIEW_SAMPLE_SHARE", "SUPPORTBOT_DOUBLE_REVIEW_SHARE"):
    if not 0.0 <= globals()[_name] <= 1.0:
        raise ImproperlyConfigured(f"{_name}={globals()[_name]} must be a share between 0 and 1.")
if SUPPORTBOT_REVIEW_LEASE_S < 30:
    raise ImproperlyConfigured("SUPPORTBOT_REVIEW_LEASE_S must be at least 30 seconds.")

# --- Bias monitoring (issue 12) -----------------------------------------------------------
# Django's cache holds the monitoring dashboard's computed figures and its refresh lock
# (nothing else uses it): with REDIS_URL in Redis, so every server process and worker
# shares one copy; else in the process. The Redis database is shared with the channel
# layer, the broker and the rate limit ("supportbot:ratelimit:*"), so the cache has a
# prefix of its own and its clear() deletes only those keys (supportbot/cache.py).
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "supportbot.cache.PrefixedRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "supportbot-cache",
            "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 10},
        }
    }

# The alert rule of the dashboard and of the counterfactual probes (docs/bias-monitoring.md):
# a segment is flagged only with at least MIN_N replies (fewer: greyed out), a
# Benjamini-Hochberg adjusted p under ALPHA, and a material gap: relative gap above
# MIN_RELATIVE_GAP, or the four-fifths ratio outside [RATIO_LOW, RATIO_HIGH].
SUPPORTBOT_BIAS_MIN_N = env_int("SUPPORTBOT_BIAS_MIN_N", 20)
SUPPORTBOT_BIAS_ALPHA = env_float("SUPPORTBOT_BIAS_ALPHA", 0.05)
SUPPORTBOT_BIAS_MIN_RELATIVE_GAP = env_float("SUPPORTBOT_BIAS_MIN_RELATIVE_GAP", 0.05)
SUPPORTBOT_BIAS_RATIO_LOW = env_float("SUPPORTBOT_BIAS_RATIO_LOW", 0.8)
SUPPORTBOT_BIAS_RATIO_HIGH = env_float("SUPPORTBOT_BIAS_RATIO_HIGH", 1.25)
if SUPPORTBOT_BIAS_MIN_N < 2 or not 0 < SUPPORTBOT_BIAS_ALPHA < 1:
    raise ImproperlyConfigured("SUPPORTBOT_BIAS_MIN_N must be at least 2 and SUPPORTBOT_BIAS_ALPHA within (0, 1).")
if not 0 < SUPPORTBOT_BIAS_RATIO_LOW <= 1 <= SUPPORTBOT_BIAS_RATIO_HIGH:
    raise ImproperlyConfigured("SUPPORTBOT_BIAS_RATIO_LOW must be in (0, 1] and SUPPORTBOT_BIAS_RATIO_HIGH at least 1.")
# The dashboard's figures are computed from the database and kept this long: a page view
# within it (with new replies since) shows them with their time; "Recompute" refreshes.
# Without new replies the kept figures are shown whatever their age.
SUPPORTBOT_MONITORING_CACHE_S = env_int("SUPPORTBOT_MONITORING_CACHE_S", 300)
# The dashboard's default window: replies of the last this many days.
SUPPORTBOT_MONITORING_DAYS = env_int("SUPPORTBOT_MONITORING_DAYS", 90)
# Every Celery worker recomputes the default window's figures this often when replies
# changed (one at a time, under a lock in the cache), so no page view waits for a
# computation; only with a shared cache (REDIS_URL). 0 turns it off. 300 s: a
# recomputation at 100,000 replies costs a few CPU seconds (docs/benchmarks.md).
SUPPORTBOT_MONITORING_REFRESH_S = env_float("SUPPORTBOT_MONITORING_REFRESH_S", 300.0)
if SUPPORTBOT_MONITORING_REFRESH_S < 0:
    raise ImproperlyConfigured("SUPPORTBOT_MONITORING_REFRESH_S must be 0 (off) or a number of seconds.")
# Counterfactual probes (manage.py bias_probe, and after every training run): how many
# of the probe set's requests to ask (each in 23 variants; all 54 by default, at least
# SUPPORTBOT_BIAS_MIN_N for a verdict) and the reply length. 64 tokens show curt replies.
SUPPORTBOT_BIAS_PROBE_AFTER_TRAINING = env_bool("SUPPORTBOT_BIAS_PROBE_AFTER_TRAINING", True)
SUPPORTBOT_BIAS_PROBE_REQUESTS = env_int("SUPPORTBOT_BIAS_PROBE_REQUESTS", 54)
SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS = env_int("SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS", 64)
