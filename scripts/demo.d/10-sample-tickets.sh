#!/usr/bin/env bash
# Demo step (run by scripts/demo.sh): import the project's own sample tickets.
# Idempotent: on a second `make demo` every ticket is reported unchanged.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" manage.py import_tickets finetune/fixtures/sample_tickets.jsonl --format jsonl --source sample --no-progress
