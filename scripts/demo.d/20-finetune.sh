#!/usr/bin/env bash
# Demo step (run by scripts/demo.sh): fine-tune the quick LoRA adapter on the sample tickets
# and promote it if it passes the gates, so the chat has a model of its own. Skipped when a
# version is already active; skipped with a message when there is no dataset yet.
# The quick recipe (finetune.ml.training.QUICK_RECIPE, docs/quality-research.md): grounded
# examples (each prompt holds the nearest other exchanges), LoRA on the top 8 layers, no
# dropout, learning rate 1e-3, batch 4, one epoch over 40 examples: about 3 minutes of
# training on two cores, plus the evaluation of 8 validation replies before and after, and
# ~25 s the first time to convert the bundled base model. A version whose replies do not
# beat the retrieval baseline would stay a candidate (the admin's version page shows why); as
# nothing is active on a fresh install, the demo promotes it anyway with a recorded reason
# (--first-version-reason) and the command says so, so the chat has a bot to try.
#   PY=.venv/bin/python bash scripts/demo.d/20-finetune.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# The bundled offline base unless the user chose one: "auto" could start a download of gpt2.
export SUPPORTBOT_BASE_MODEL=${SUPPORTBOT_BASE_MODEL:-smollm2}
# The run then probes the new version for bias (docs/bias-monitoring.md). The demo asks 20
# requests (the fewest that give a verdict) in their 23 variants, 32 tokens per reply: about
# a minute on two cores instead of several for the full 54; the version page shows the report.
export SUPPORTBOT_BIAS_PROBE_REQUESTS=${SUPPORTBOT_BIAS_PROBE_REQUESTS:-20}
export SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS=${SUPPORTBOT_BIAS_PROBE_MAX_NEW_TOKENS:-32}

"$PY" manage.py finetune --skip-if-active --build-fresh-if-missing \
  --epochs 1 --max-examples 40 --lora-layers 8 --lora-dropout 0 --batch-size 4 --grad-accum-steps 1 \
  --learning-rate 0.001 --eval-samples 8 --max-eval-examples 16 --promote \
  --first-version-reason "make demo: the first version of a fresh install, promoted so the demo chat has a model to try"
status=$?
if [ "$status" -eq 3 ]; then
  echo "Skipping fine-tuning: there is no dataset of sample tickets yet (see the message above)."
  echo "The demo goes on without a fine-tuned model; build a dataset, then use Admin > Training runs > Retrain now."
  exit 0
fi
exit "$status"
