#!/usr/bin/env bash
# One device call for the single-GPU engine (issue 10). Stages, each under its own time limit, all
# output under $OUT:
#   tests     GPU tests: Triton kernels vs torch, CUDA graphs vs eager, engine vs reference
#   kernels   bench/kernel_check.py: expert paths, varlen paged attention, add+RMSNorm (device time)
#   decode12  12-layer Qwen3-30B-A3B shape: engine (CUDA graphs) vs transformers, roofline, profile
#   presets   bench-moge, the 48-layer qwen3-30b-a3b preset (TPOT b=1, tok/s b=256), 2k prefill
# Usage (device tool, from the repository root): bash bench/gpu_engine_check.sh tests kernels decode12
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
stages=${*:-tests kernels decode12}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
log="$OUT/bench.log"
for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    tests)
      timeout ${T_TESTS:-110} python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_kernels.py \
        tests/gpu/test_cuda_graphs.py tests/gpu/test_engine_gpu.py tests/gpu/test_model_gpu.py > "$OUT/gpu_tests.txt" 2>&1
      tail -4 "$OUT/gpu_tests.txt" ;;
    kernels)
      timeout ${T_KERNELS:-45} python3 bench/kernel_check.py --out "$OUT/kernels.jsonl" --tokens ${TOKENS:-1,4,8,16,32,128} \
        --skip ${KSKIP:-norms} 2>>"$log" | tail -12 ;;
    decode12)
      timeout ${T_DECODE:-120} python3 bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --shape gpu \
        --batch-sizes ${BATCHES:-1,32,128} --systems ${SYSTEMS:-graphs,transformers} --profile-batches ${PROFILE:-1,128} \
        --out "$OUT/decode.jsonl" 2>>"$log" | grep -v '"event"' | cut -c1-220 ;;
    presets)
      timeout ${T_MOGE:-50} python3 bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --systems graphs \
        --preset bench-moge:${MOGE_BATCHES:-1,32,128} --out "$OUT/decode.jsonl" 2>>"$log" | grep -v '"event"' | cut -c1-220
      timeout ${T_QWEN48:-120} python3 bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --systems graphs \
        --preset qwen3-30b-a3b:1,256 --prefill 2048x8 --profile-batches 1 --out "$OUT/decode.jsonl" 2>>"$log" | cut -c1-220 ;;
  esac
  echo "== $stage: $(( $(date +%s) - t0 )) s (rc ${PIPESTATUS[0]})"
done
tail -c 3000 "$log" | grep -v '^\s*$' | tail -15
