#!/usr/bin/env bash
# One device-machine call: install the carried Ray bundle, run the GPU tests, then the benchmarks
# behind docs/performance.md. Everything goes to $OUT. Usage (from the device tool, carry .bundle):
#   bash bench/gpu_session.sh [tests|decode|dataplane|elastic|all]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m protos.generate || exit 1
if [[ $what == tests || $what == all ]]; then
  timeout 300 python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
fi
if [[ $what == decode || $what == all ]]; then
  timeout 400 python3 bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --shape gpu \
    --batch-sizes ${DECODE_BATCHES:-1,8,32,128} --new-tokens 32 --moge-preset bench-moge 2>/dev/null | tee "$OUT/decode.jsonl"
fi
if [[ $what == dataplane || $what == all ]]; then
  timeout 400 python3 bench/dataplane.py --preset bench-moge --batch-sizes ${DP_BATCHES:-1,8,32,64,128,256} \
    --transports grpc --workers 2 --replica-gpus 0.5 --worker-gpus 0.25 --out "$OUT/dataplane.json" 2>&1 | tail -40
fi
if [[ $what == elastic || $what == all ]]; then
  for run in "0 peer" "1 peer" "1 checkpoint"; do set -- $run; standby=$1; source=$2
    timeout 300 python3 bench/scale_latency.py --model preset:bench-moge --device cuda --dtype bfloat16 \
      --gpus-per-worker 0.25 --standby $standby --source $source --out "$OUT/scale_${standby}_$source.json" 2>&1 | grep -v '^\[\|WARNING\|INFO' | tail -30
  done
fi
