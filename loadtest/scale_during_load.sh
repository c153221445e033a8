#!/usr/bin/env bash
# Locust against a local elastic cluster while the expert devices are scaled 1 -> 2 -> 4 -> 2 live.
#   bash loadtest/scale_during_load.sh [OUT_DIR]      (about 2 minutes; loopback only)
# Writes the runner's CSVs, summary.md and loadtest.png (with the device count over time) to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/loadtest-elastic}
py=${PYTHON:-.venv/bin/python}
port=${PORT:-8100}
key=$("$py" -c 'import secrets; print("sk-" + secrets.token_hex(12))')
export MOGE_ADMIN_KEY=$key
timeout 400 "$py" -m cluster.cli.main serve --elastic --workers 1 --port "$port" --api-key "$key" --admin-key "$key" \
  > /tmp/moge-elastic-serve.log 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf -m 2 "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
url="http://127.0.0.1:$port"
(
  sleep 20; timeout 120 "$py" -m cluster.cli.main scale 2 --url "$url"
  sleep 20; timeout 120 "$py" -m cluster.cli.main scale 4 --url "$url"
  sleep 20; timeout 120 "$py" -m cluster.cli.main scale 2 --url "$url"
) > "/tmp/moge-elastic-scale.log" 2>&1 &
scaler=$!
timeout 300 "$py" -m loadtest.runner --url "$url" --api-key "$key" --shape constant --users 8 --duration 90 --out "$out"
wait $scaler
cat /tmp/moge-elastic-scale.log
"$py" -m cluster.cli.main status --url "$url"
