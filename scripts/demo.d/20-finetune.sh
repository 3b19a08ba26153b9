#!/usr/bin/env bash
# Demo step (run by scripts/demo.sh): fine-tune a quick LoRA adapter on the sample tickets
# and promote it, so the chat has a model of its own. Skipped when a version is already
# active; skipped with a message when there is no dataset and no dataset builder yet.
# A small run on purpose (1 epoch, 64 examples of at most 128 tokens): about 1-3 minutes
# on two CPU cores, plus ~25 s the first time to convert the bundled base model.
#   PY=.venv/bin/python bash scripts/demo.d/20-finetune.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# The bundled offline base unless the user chose one: "auto" could start a download of gpt2.
export SUPPORTBOT_BASE_MODEL=${SUPPORTBOT_BASE_MODEL:-smollm2}

"$PY" manage.py finetune --skip-if-active --build-fresh-if-missing \
  --epochs 1 --max-examples 64 --max-length 128 --batch-size 8 --grad-accum-steps 1 \
  --learning-rate 0.001 --eval-samples 8 --eval-max-new-tokens 48 --max-eval-examples 32 --promote
status=$?
if [ "$status" -eq 3 ]; then
  echo "Skipping fine-tuning: there is no dataset of sample tickets yet (see the message above)."
  echo "The demo goes on without a fine-tuned model; build a dataset, then use Admin > Training runs > Retrain now."
  exit 0
fi
exit "$status"
