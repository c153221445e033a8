#!/usr/bin/env bash
# One device call (at most ~7 minutes, no Ray): the FP8 GPU tests, then the FP8 measurements with
# same-run bf16 baselines (bench/fp8_decode.py), a short table last. Results: JSON lines under $OUT.
#   bash bench/gpu_fp8.sh            (from the device tool; nothing to carry)
# Every step has a timeout and the whole script a budget (FP8_BUDGET_S, default 410 s): a step that
# would start past it is skipped, so the table always prints.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
BUDGET=${FP8_BUDGET_S:-410}
START=$SECONDS


nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

# 1. the new GPU tests (kernels against a dequantized reference; FP8 models; reports to fp8_accuracy.jsonl)
export MOGE_REPORT_DIR=$OUT
step tests 170 python3 -m pytest -q -s -p no:cacheprovider \
  tests/gpu/test_fp8_kernels.py tests/gpu/test_fp8_model_gpu.py 2>&1 | grep -v '^{' | tail -25 | tee "$OUT/gpu_tests.txt"
# 2. Pangu Pro MoE 72B shape: FP8 48 layers (one GPU), bf16 at 24 layers (48 do not fit), decode at
#    2,048- and 16-token contexts, routed-expert kernel bandwidth
step pangu 130 python3 bench/fp8_decode.py --preset pangu-pro-moe-72b --runs fp8,none:24 --batches 1,64,128,0 \
  --contexts 2048,16 --max-batch-cap 256 --kv-fraction 0.92 --reserve-gb 4 --steps 10 --kernels 1,16,64,128 \
  --out "$OUT/pangu.jsonl"
# 3. Qwen3-30B-A3B 48 layers: FP8 and bf16, TPOT at batch 1 and tokens/s at batch 256
step qwen3 70 python3 bench/fp8_decode.py --preset qwen3-30b-a3b --runs fp8,none --batches 1,256 --contexts 128 \
  --steps 10 --kernels 1,32,256 --out "$OUT/qwen3.jsonl"
# 4. bf16 12 layers of the Qwen3 shape: roofline share at batch 1/32/128, torch vs Triton grouped
step qwen3_12l 40 python3 bench/fp8_decode.py --preset qwen3-30b-a3b --runs none:12 --batches 1,32,128 --contexts 128 \
  --steps 10 --kernels 32,128 --out "$OUT/qwen3_12l.jsonl"
python3 bench/fp8_decode.py --summary "$OUT" | tee "$OUT/summary.txt"
