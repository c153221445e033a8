#!/usr/bin/env bash
# The last 2x H200 call of a session (carry .bundle): step lane vs monolithic without ping-pong
# (worker loops in CUDA graphs), the 1 <-> 2 GPU local scaling with device vs object store, then
# the step lane with ping-pong on eager worker loops. Every step under its own timeout; logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
python3 -m protos.generate >/dev/null 2>&1
step() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  timeout -s ABRT "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 )) s"; grep -v 'Warning\|warn(' "$OUT/$name.log" | grep '^{\|Error\|error' | cut -c1-400 | tail -12; }
step engine ${T_ENGINE:-110} python3 bench/nccl_lane.py engine --preset bench-moge --batch-sizes 1,64,128,256 \
  --steps 10 --ping-pong off --out "$OUT/engine.json"
step scale_local ${T_SCALE:-150} python3 bench/scale_latency.py --local --model preset:bench-moge --device cuda \
  --dtype bfloat16 --gpus-per-worker 1 --standby 1 --sources device,object_store --concurrency 8 --steady-s 3 \
  --settle-s 2 --stage-timeout-s 45 --deadline-s 140 --out "$OUT/scale_local.json"
MOGE_LANE_GRAPHS=0 step engine_pingpong ${T_PP:-90} python3 bench/nccl_lane.py engine --preset bench-moge \
  --batch-sizes 1,256 --steps 8 --ping-pong on --out "$OUT/engine_pingpong.json"
