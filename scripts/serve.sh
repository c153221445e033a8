#!/usr/bin/env bash
# The main job: set up, then serve the embedded tiny MoGE model on a local Ray cluster at 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moge serve "$@"
