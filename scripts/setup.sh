#!/usr/bin/env bash
# Create .venv and install the project with the given extras (default: none).
# Pins the CPU build of torch where this machine keeps it on disk, so a fresh machine never pulls the
# multi-GB CUDA build; on GPU hosts the torch already installed (2.11-2.13) is kept.
# Writes a stamp (hash of pyproject.toml + extras) that scripts/serve.sh compares to skip setup.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
venv=${MOGE_VENV:-.venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
echo "setup: installing the project${extras:+ with [$extras]} into $venv (a few minutes the first time) ..."
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
pip_args=()
cons=$(mktemp)
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  pip_args+=(--find-links /opt/wheels)
  echo "torch==2.13.0+cpu" > "$cons"
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
# bytecode at install time: Ray workers start about twice as fast (PYTHONDONTWRITEBYTECODE is set here)
"$venv/bin/python" -m pip install -q --compile "${pip_args[@]}" -c "$cons" -e "$target"
rm -f "$cons"
if [[ ",$extras," == *",rayllm,"* ]]; then
  # only SGLang's protocol models are used (by ray.serve.llm at import): not its engine, not its deps
  "$venv/bin/python" -m pip install -q --no-deps "sglang==0.5.23"
fi
"$venv/bin/python" -m protos.generate >/dev/null 2>&1 || true
bash scripts/venv_stamp.sh "$extras" > "$venv/.moge-setup-stamp"
echo "ready: $venv"
