#!/usr/bin/env bash
# One device-machine call (one H200, at most 6 minutes): the single-GPU GPU tests the dispatcher
# change touches, then the served measurement of issue 18 — bench-moge, an elastic replica with 2
# expert workers on fractional GPUs of the same device, 8 greedy streams: tokens/s over the per-call
# gRPC carrier vs the per-step gRPC stream (and the stream with ping-pong, for the ping-pong rule).
# Everything goes to $OUT; a short table comes last. Usage (device tool, carry .bundle):
#   bash bench/gpu_dispatcher.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/timeline.txt"; }
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 60 python3 -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)' | tee -a "$OUT/gpu.txt"
timeout 60 python3 -m protos.generate || { stamp "protos.generate failed"; exit 1; }

stamp "gpu tests"
timeout 190 python3 -m pytest -q -rs -p no:cacheprovider -o faulthandler_timeout=170 \
  tests/gpu/test_kernels.py tests/gpu/test_cuda_graphs.py tests/gpu/test_model_gpu.py tests/gpu/test_engine_gpu.py \
  tests/gpu/test_gpu_workers.py 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
stamp "gpu tests rc=$tests_rc"

stamp "served: per-call vs per-step gRPC stream"
timeout 150 python3 bench/served_dispatcher.py --preset bench-moge --workers 2 --worker-gpus 0.25 --streams 8 \
  --seconds 15 --warmup-s 5 --modes off,stream,stream+pp --deadline-s 140 --out "$OUT/served.json" \
  > "$OUT/served.txt" 2> "$OUT/served.err"
served_rc=$?
stamp "served rc=$served_rc"

echo "== GPU tests (rc $tests_rc): $(grep -E 'passed|failed|error' "$OUT/gpu_tests.txt" | tail -1)"
echo "== served (rc $served_rc; before this change: 46 tok/s per call, ping-pong on)"
grep '^|' "$OUT/served.txt" || tail -5 "$OUT/served.err"
