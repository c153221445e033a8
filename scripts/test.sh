#!/usr/bin/env bash
# Set up (dev extras) and run the whole test suite. As root it runs inside a loopback-only network
# namespace, so no test can send traffic anywhere but 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,loadtest,rayllm  # rayllm: tests/integration/test_ray_serve_llm.py runs in CI
run=(.venv/bin/python -m pytest -q -rs "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' _ "${run[@]}"
fi
exec "${run[@]}"
