#!/usr/bin/env bash
# The main job: serve the embedded tiny MoGE model on a local Ray cluster at 127.0.0.1:8000.
# Sets up .venv first only when it is missing or stale (pyproject.toml changed since the last setup),
# so a second start begins serving at once, without touching the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MOGE_VENV:-.venv}
stamp="$venv/.moge-setup-stamp"
# any earlier setup with extras also holds the main dependencies: compare the hash part only
want=$(bash scripts/venv_stamp.sh | cut -d' ' -f1)
have=$(cut -d' ' -f1 "$stamp" 2>/dev/null || true)
if [ ! -x "$venv/bin/moge" ] || [ "$want" != "$have" ] || [ ! -f protos/moge_expert_pb2.py ]; then
  bash scripts/setup.sh
fi
exec "$venv/bin/moge" serve "$@"
