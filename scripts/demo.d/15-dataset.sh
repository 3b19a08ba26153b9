#!/usr/bin/env bash
# Demo step (run by scripts/demo.sh): build a redacted fine-tuning dataset from the imported tickets.
# Uses SUPPORTBOT_BASE_MODEL's tokenizer (offline: the bundled SmolLM2, converted once in ~20 s).
# A rebuild from unchanged tickets reuses the existing dataset version instead of adding a copy.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" manage.py build_dataset --no-progress
