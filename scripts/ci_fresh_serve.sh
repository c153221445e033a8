#!/usr/bin/env bash
# CI: README command 1 (`bash scripts/serve.sh`) from a fresh virtual environment WITHOUT extras, so a
# runtime import that only the dev extra provides fails here. Setup needs the package index, so it
# runs first; the server then starts through serve.sh itself (which must find the environment up to
# date and start at once) inside a loopback-only network namespace, must answer /v1/models, and is
# stopped with SIGTERM (bounded waits throughout).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
export MOGE_VENV="$work/venv"
bash scripts/setup.sh
port=${MOGE_CI_PORT:-18000}
log="$work/serve.log"
check='
  set -u
  ip link set lo up
  bash scripts/serve.sh --port "$0" >"$1" 2>&1 &
  pid=$!
  ok=1
  for _ in $(seq 1 240); do
    if "$MOGE_VENV/bin/python" -c "import json, sys, urllib.request; d = json.load(urllib.request.urlopen(\"http://127.0.0.1:$0/v1/models\", timeout=5)); sys.exit(0 if d[\"data\"] else 1)" 2>/dev/null; then ok=0; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  kill -TERM $pid 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -KILL $pid 2>/dev/null || true
  exit $ok
'
if unshare -n true 2>/dev/null; then
  run=(unshare -n bash -c "$check" "$port" "$log")
else
  run=(bash -c "$check" "$port" "$log")
fi
if "${run[@]}"; then
  echo "fresh-environment serve: /v1/models answered"
  rm -rf "$work"
else
  echo "fresh-environment serve FAILED; its log:" >&2
  tail -50 "$log" >&2
  exit 1
fi
