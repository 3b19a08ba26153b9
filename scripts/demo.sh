#!/usr/bin/env bash
# Run by `make demo` after install and migrate: demo logins, sample data, then a
# Celery worker and daphne side by side until Ctrl-C. Works offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
WS_MAX_MESSAGE=${WS_MAX_MESSAGE:-65536}
mkdir -p var/log
# The bundled offline base model, unless the user chose one: "auto" would try the Hub
# for gpt2 first. Exported so the dataset, the quick adapter and admin retrains agree.
export SUPPORTBOT_BASE_MODEL=${SUPPORTBOT_BASE_MODEL:-smollm2}

echo "==> Demo logins"
"$PY" manage.py demo_setup | tee var/log/demo-logins.txt

for step in scripts/demo.d/*.sh; do
  [ -e "$step" ] || continue
  echo "==> $(basename "$step" .sh)"
  PY="$PY" bash "$step"
done

echo "==> Starting the Celery worker (log: var/log/worker.log)"
"$BIN/celery" -A supportbot worker --pool=solo -Q default,training --loglevel=INFO >var/log/worker.log 2>&1 &
WORKER=$!
echo "==> Starting daphne on http://$HOST:$PORT (log: var/log/daphne.log)"
"$BIN/daphne" -b "$HOST" -p "$PORT" --websocket-max-message-size "$WS_MAX_MESSAGE" \
  supportbot.asgi:application >var/log/daphne.log 2>&1 &
SERVER=$!
trap 'echo; echo "Stopping…"; kill $WORKER $SERVER 2>/dev/null; wait 2>/dev/null; exit 0' INT TERM

for _ in $(seq 1 60); do
  if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://$HOST:$PORT/healthz', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "daphne exited; see var/log/daphne.log"; tail -20 var/log/daphne.log; exit 1; fi
  sleep 1
done

# daphne loads the active model in the background as it starts; wait for it (up to a
# minute) so the first chat answers at once, and say what it serves.
"$PY" - "http://$HOST:$PORT/healthz" <<'PY' || true
import json, sys, time, urllib.error, urllib.request

deadline = time.monotonic() + 60
while True:
    try:
        body = urllib.request.urlopen(sys.argv[1], timeout=5).read()
    except urllib.error.HTTPError as error:  # 503 still carries the report
        body = error.read()
    model = json.loads(body)["checks"]["model"]
    here = model.get("this_process") or {}
    if not model.get("active_version"):
        print("No model version is active: the chat says so and offers a human.")
    elif here.get("serving"):
        print(f"Serving model {here['serving']}.")
    elif here.get("error"):
        print(f"The model failed to load: {here['error']} (see var/log/daphne.log).")
    elif time.monotonic() > deadline:
        print("The model is still loading; the first reply may take a few seconds.")
    else:
        time.sleep(1)
        continue
    break
PY

cat <<MSG

SupportBot is running.
  Chat (customer):    http://$HOST:$PORT/chat/
  Agent workspace:    http://$HOST:$PORT/agent/
  Admin:              http://$HOST:$PORT/admin/
  Health:             http://$HOST:$PORT/healthz
Logins:
$(cat var/log/demo-logins.txt)
Press Ctrl-C to stop.
MSG
wait
