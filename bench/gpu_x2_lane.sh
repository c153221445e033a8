#!/usr/bin/env bash
# The step lane on nvidia-h200-x2, one device call, no Ray (carry only .dev/<name>), under 200 s:
#   1. tests/gpu/test_step_lane_gpu.py: NCCL step lane == single-process greedy tokens, without and
#      with ping-pong, replica decode steps replayed from CUDA graphs with the lane ops inside
#   2. bench/nccl_lane.py engine, batches 1,64,256: monolithic, then step lane (replica graphs on)
#      with ping-pong off, then on (one process: rows print as JSON lines as they are measured, so
#      a hang in the ping-pong part still leaves the earlier rows in engine.log)
# Every step under `timeout -s ABRT` with PYTHONFAULTHANDLER=1 (a hang dumps every thread's stack
# into its log); logs and JSON under $OUT. Knobs: T_TEST, T_ENGINE (seconds), BATCHES, STEPS.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
T0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())' \
  >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout 20 python3 -m protos.generate > "$OUT/protos.log" 2>&1
step() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout -s ABRT "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - T0 )) s)"
  grep -v 'Warning\|warn(' "$OUT/$name.log" | grep '^{\|Error\|error\|passed\|failed\|PASSED\|FAILED\|Timeout' | cut -c1-600 | tail -16; }
step gpu_test ${T_TEST:-70} python3 -m pytest -q -x -rA --tb=short -p no:cacheprovider \
  -o faulthandler_timeout=$(( ${T_TEST:-70} - 6 )) tests/gpu/test_step_lane_gpu.py
step engine ${T_ENGINE:-110} python3 bench/nccl_lane.py engine --preset bench-moge --batch-sizes ${BATCHES:-1,64,256} \
  --steps ${STEPS:-10} --ping-pong off,on --out "$OUT/engine.json"
echo "== done in $(( $(date +%s) - T0 )) s"
