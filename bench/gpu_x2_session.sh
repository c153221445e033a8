#!/usr/bin/env bash
# ONE device call on nvidia-h200-x2 for issues 11 (step-level NCCL data plane) and 12 (device-to-device
# group migration), from the repository root with carry [".bundle"], in well under 540 s:
#   bash bench/gpu_x2_session.sh
# Steps, most valuable first, each under its own `timeout` (sized from the time left, so the whole
# run ends by BUDGET_S) and each appending to $OUT/session.log whatever happens to the others:
#   a1  tests/gpu/test_step_lane_gpu.py      NCCL step lane tokens == single process (graphs, ping-pong)
#   a2  tests/gpu/test_group_copy_gpu.py     NCCL group copy, exact bytes, refusal
#   b   bench/nccl_lane.py engine            bench-moge, attention GPU0 / all groups GPU1, monolithic vs
#                                            step lane vs step lane + ping-pong, batches 1,64,128,256
#       (rerun with MOGE_LANE_GRAPHS=0, eager lanes, if b produced no step-lane row and time is left)
#   c1  bench/scale_latency.py --local       1 <-> 2 GPUs, device lane vs object store, new-replica baseline
#   c2  bench/scale_latency.py               worker -> worker, if time is left
# Files back (<= 8): session.log, engine.jsonl, [engine_eager.jsonl], scale_local.json, [scale_workers.json].
# A step that times out gets SIGABRT, so every Python process of it prints all its threads' stacks
# (PYTHONFAULTHANDLER) into the log before dying: a hang says where it hung.
set -uo pipefail
T0=$SECONDS
BUDGET_S=${BUDGET_S:-525}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ulimit -c 0

log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
NOISE=' INFO \|socket.cpp\|Warning: \|warnings.warn\|^ *$'

# run NAME WANT_S MIN_S CMD...: CMD under timeout min(WANT_S, time left); its output (noise dropped,
# the last 150 lines) goes to the log; returns CMD's status (124/134 = timed out).
run() {
  local name=$1 want=$2 min=$3; shift 3
  local l; l=$(left)
  local t=$(( want < l ? want : l ))
  if (( t < min )); then log "== $name SKIPPED: ${l}s left, needs >= ${min}s"; return 99; fi
  log "== $name (timeout ${t}s): $*"
  local tmp="/tmp/gpu_x2_$name.txt"
  timeout -s ABRT -k 10 "$t" "$@" > "$tmp" 2>&1
  local rc=$?
  grep -v "$NOISE" "$tmp" | tail -n 150 >> "$LOG"
  if (( rc == 124 || rc == 134 || rc == 137 )); then log "== $name TIMED OUT or aborted (rc=$rc)"; else log "== $name rc=$rc"; fi
  return $rc
}

# ---- environment and the Ray bundle (pydantic, ray, redis come with it) ----------------------------
log "host $(hostname) start"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
nvidia-smi topo -m 2>/dev/null | head -4 >> "$LOG"
B=.bundle; [ -d "$B" ] || B=../../.bundle  # from the repo root, or from .dev/<name> (devsync)
if [ -d "$B" ] && [ ! -d /tmp/site/ray ]; then
  log "installing the bundle from $B"
  mkdir -p /tmp/site && timeout 120 tar -xJf "$B/ray.tar.xz" -C /tmp/site &&
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$B"/wheels/*.whl >> "$LOG" 2>&1
  log "bundle install rc=$?"
else
  log "no bundle at $B (or already installed): Ray steps will fail"
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count(), "transformers", transformers.__version__)' >> "$LOG" 2>&1
python3 -c 'import ray, pydantic, redis; print("ray", ray.__version__, "pydantic", pydantic.__version__)' >> "$LOG" 2>&1 || log "Ray/pydantic not importable"
python3 -m protos.generate >> "$LOG" 2>&1 || log "protos.generate failed (gRPC paths will fail)"

PYTEST=(python3 -m pytest -q -x -rA --tb=short -p no:cacheprovider -o faulthandler_timeout=100)

# ---- a: correctness on the GPUs ---------------------------------------------------------------------
run a1_step_lane_test 140 40 "${PYTEST[@]}" tests/gpu/test_step_lane_gpu.py
run a2_group_copy_test 70 30 "${PYTEST[@]}" tests/gpu/test_group_copy_gpu.py

# ---- b: issue 11, step lane vs monolithic (no Ray) --------------------------------------------------
run b_engine 170 60 python3 bench/nccl_lane.py engine --preset bench-moge --batch-sizes 1,64,128,256 \
  --steps 12 --out "$OUT/engine.json"
grep -h '^{' /tmp/gpu_x2_b_engine.txt > "$OUT/engine.jsonl" 2>/dev/null
rm -f "$OUT/engine.json"  # the same rows as engine.jsonl (which also keeps a partial run's rows)
if ! grep -q '"steplane' "$OUT/engine.jsonl" 2>/dev/null && (( $(left) > 320 )); then
  log "b produced no step-lane row: once more with eager lanes (MOGE_LANE_GRAPHS=0), batches 1,128"
  MOGE_LANE_GRAPHS=0 run b_engine_eager 110 60 python3 bench/nccl_lane.py engine --preset bench-moge \
    --batch-sizes 1,128 --steps 8
  grep -h '^{' /tmp/gpu_x2_b_engine_eager.txt > "$OUT/engine_eager.jsonl" 2>/dev/null
fi

# ---- c: issue 12, live 1 <-> 2 scaling (Ray) --------------------------------------------------------
ray_stop() { timeout 30 python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1; }
# the replica (this process) holds every bench-moge group on GPU A; 1 -> 2 -> 1 moves half of them to a
# standby worker on GPU B and back; device lane vs object store (the replica is no Ray actor, so its
# object-store scale-up falls back to the checkpoint; its scale-down uses the worker's object store)
L=$(left); D=$(( (L < 200 ? L : 200) - 20 ))
run c1_scale_local 200 90 python3 bench/scale_latency.py --local --model preset:bench-moge --device cuda \
  --dtype bfloat16 --gpus-per-worker 1 --standby 1 --sources device,object_store --concurrency 8 \
  --steady-s 3 --settle-s 2 --stage-timeout-s 60 --deadline-s "$D" --out "$OUT/scale_local.json"
ray_stop
# worker -> worker (1 -> 2 workers, one GPU each, the second a warm standby; the replica shares GPU0)
L=$(left); D=$(( (L < 180 ? L : 180) - 20 ))
run c2_scale_workers 180 120 python3 bench/scale_latency.py --model preset:bench-moge --device cuda \
  --dtype bfloat16 --from-workers 1 --gpus-per-worker 1 --standby 1 --sources device,object_store \
  --concurrency 8 --steady-s 3 --settle-s 2 --stage-timeout-s 60 --deadline-s "$D" --no-baseline \
  --out "$OUT/scale_workers.json"
ray_stop

log "done; files: $(cd "$OUT" && ls | tr '\n' ' ')"
