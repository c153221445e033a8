#!/usr/bin/env bash
# One device call (at most 5 minutes) for engine.batch_invariant (issue 19), every stage under its own
# time limit, everything under $OUT, the short table last:
#   tests   tests/gpu/test_invariant_kernels.py (matmul rows vs M, MoE under any token grouping, fixed
#           KV splits) and tests/gpu/test_batch_invariance_gpu.py (bench-moge and the 12-layer
#           Qwen3-30B-A3B shape: logits alone vs among 1..255 others, cached prefix, chunked prefill)
#   moge    bench/batch_invariance.py on bench-moge: decode at batch 1/32/128 default vs invariant,
#           1,500-token prefill, and the first differing token of 40/300/1,500-token prompts
#   qwen    the same on the 12-layer Qwen3-30B-A3B shape
# Usage (device tool, from the repository root): bash bench/gpu_invariant.sh [tests moge qwen]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
export TQDM_DISABLE=1
stages=${*:-tests moge qwen}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
log="$OUT/bench.log"
for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    tests)
      timeout ${T_TESTS:-140} python3 -m pytest -q -rs -p no:cacheprovider --durations=6 tests/gpu/test_invariant_kernels.py \
        tests/gpu/test_batch_invariance_gpu.py > "$OUT/gpu_tests.txt" 2>&1
      tail -14 "$OUT/gpu_tests.txt" ;;
    moge)
      timeout ${T_MOGE:-70} python3 bench/batch_invariance.py --preset bench-moge --batches ${BATCHES:-1,32,128} \
        --out "$OUT/invariance.jsonl" 2>>"$log" | cut -c1-240 ;;
    qwen)
      timeout ${T_QWEN:-75} python3 bench/batch_invariance.py --preset qwen3-12-layers --batches ${BATCHES:-1,32,128} \
        --out "$OUT/invariance.jsonl" 2>>"$log" | cut -c1-240 ;;
  esac
  echo "== $stage: $(( $(date +%s) - t0 )) s (rc ${PIPESTATUS[0]})"
done
tail -c 2000 "$log" | grep -v '^\s*$' | tail -8
python3 bench/batch_invariance.py --table "$OUT/invariance.jsonl" | tee "$OUT/table.md"
