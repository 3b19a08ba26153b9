#!/usr/bin/env bash
# Demo step (run by scripts/demo.sh): import the project's own sample tickets.
# Idempotent: on a second `make demo` every ticket is reported unchanged.
set -euo pipefail
PY=${PY:-.venv/bin/python}
# sample_tickets_shipping.jsonl: delivery-address changes in English and French (the demo asks one in French).
for file in finetune/fixtures/sample_tickets.jsonl finetune/fixtures/sample_tickets_shipping.jsonl; do
  "$PY" manage.py import_tickets "$file" --format jsonl --source sample --no-progress
done
