#!/usr/bin/env bash
# One device call for issues 19 and 20 together (no Ray; nothing to carry), most needed first, every
# step under its own timeout and the whole under GPU_BUDGET_S (default 430 s); results under $OUT:
#   1. FP8 GPU tests: kernels against a dequantized reference, FP8 models' greedy tokens and logits
#   2. batch-invariant GPU tests: matmul rows vs M, MoE under any grouping, fixed KV splits, the
#      engine's logits alone vs among others (bench-moge, the 12-layer Qwen3-30B-A3B shape)
#   3. Pangu Pro MoE 72B: FP8 at 48 layers on one GPU, bf16 at 24 layers as the same-run baseline
#   4. invariant mode's cost on bench-moge, default vs invariant in the same run, and the
#      first-differing-token check
#   bash bench/gpu_fp8_invariant.sh      (device tool, repository root)
#   STEPS="fp8_tests pangu" bash bench/gpu_fp8_invariant.sh     (some steps only)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
export TQDM_DISABLE=1 MOGE_REPORT_DIR=$OUT; mkdir -p "$OUT/inv"
BUDGET=${GPU_BUDGET_S:-430}
START=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

step fp8_tests 150 python3 -m pytest -q -rs -p no:cacheprovider --durations=5 \
  tests/gpu/test_fp8_kernels.py tests/gpu/test_fp8_model_gpu.py > "$OUT/fp8_tests.txt" 2>&1
tail -15 "$OUT/fp8_tests.txt"
step invariant_tests 120 python3 -m pytest -q -rs -p no:cacheprovider --durations=5 \
  tests/gpu/test_invariant_kernels.py tests/gpu/test_batch_invariance_gpu.py > "$OUT/invariant_tests.txt" 2>&1
tail -15 "$OUT/invariant_tests.txt"
step pangu 100 python3 bench/fp8_decode.py --preset pangu-pro-moe-72b --runs fp8,none:24 --batches 1,64 \
  --contexts 2048 --max-batch-cap 256 --kv-fraction 0.92 --reserve-gb 4 --steps 10 --kernels 1,64 \
  --out "$OUT/pangu.jsonl" 2>"$OUT/pangu.err"
step invariant_cost 60 python3 bench/batch_invariance.py --preset bench-moge --batches 1,32,128 \
  --out "$OUT/inv/invariance.jsonl" 2>"$OUT/inv/invariance.err"
python3 bench/fp8_decode.py --summary "$OUT" | tee "$OUT/fp8_summary.txt"
python3 bench/batch_invariance.py --table "$OUT/inv/invariance.jsonl" | tee "$OUT/invariance_table.md"
