#!/usr/bin/env bash
# The setup stamp: what the environment was installed from (pyproject.toml's hash and the extras).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "$(sha256sum pyproject.toml | cut -d' ' -f1) extras=${1:-}"
