#!/usr/bin/env bash
# Start one vLLM CPU server for SupportBot: the base model, with LoRA adapters loaded at run time.
#
#   scripts/vllm-serve.sh [PORT [VLLM_ARG...]]   # PORT defaults to $VLLM_PORT, else 8400
#
# Used by the Procfile (make cluster) and bench/bench_scale.py (which adds --max-num-seqs and a
# second served name: arguments after PORT go to vLLM last, so they override those below). The server runs from its own venv (built once by
# scripts/vllm-venv.sh). It serves the base model under "supportbot-base"; model versions
# are adapters the promotion service loads by name (supportbot-v<N>) through
# POST /v1/load_lora_adapter, which VLLM_ALLOW_RUNTIME_LORA_UPDATING enables: bind the
# server to a private address only (VLLM_HOST), never expose it publicly.
# The base is SUPPORTBOT_VLLM_BASE (a model directory), else SUPPORTBOT_BASE_MODEL resolved
# as the trainer does (default here: the bundled SmolLM2-135M-Instruct, converted once into
# the model store). GPT-2 has no LoRA in vLLM: see docs/deploy.md for its merged exports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HOST=${VLLM_HOST:-127.0.0.1}
PORT=${1:-${VLLM_PORT:-8400}}
[ $# -gt 0 ] && shift
if [ -z "${SUPPORTBOT_VLLM_BASE:-}" ]; then
  SUPPORTBOT_VLLM_BASE=$("$PY" -c '
import os, sys
from finetune.ml.base_model import resolve_base_model
store = os.environ.get("SUPPORTBOT_MODEL_STORE", "var/models")
print(resolve_base_model(os.environ.get("SUPPORTBOT_BASE_MODEL", "smollm2"), store).path)
')
fi
VLLM_PY=$(scripts/vllm-venv.sh)
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
# KV cache in GiB: ~2 GiB holds about 40 conversations of 2,000 tokens of SmolLM2-135M.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# The n-gram ban vLLM lacks (finetune/serving/vllm_logits.py) is imported from this checkout;
# nothing else of the project is (its venv has only vLLM's dependencies).
export PYTHONPATH="$PWD"
echo "vLLM: serving $SUPPORTBOT_VLLM_BASE on http://$HOST:$PORT" >&2
exec "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
  --model "$SUPPORTBOT_VLLM_BASE" --served-model-name supportbot-base \
  --host "$HOST" --port "$PORT" \
  --logits-processors finetune.serving.vllm_logits:NoRepeatNGramLogitsProcessor \
  --enable-lora --max-lora-rank "${VLLM_MAX_LORA_RANK:-32}" --max-loras "${VLLM_MAX_LORAS:-4}" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" --dtype "${VLLM_DTYPE:-auto}" \
  "$@"
