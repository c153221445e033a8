#!/usr/bin/env bash
# One 2x H200 call (nvidia-h200-x2, carry .bundle), under 150 s: the GPU tests of the fused expert
# path's split/stacked identity (fast), then the 1 <-> 2 GPU local scaling, device lane vs object
# store, with the migration fixes (copy stream, warm standby, shape-keyed GEMV tuning). Logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
python3 -m protos.generate >/dev/null 2>&1
step() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  timeout -s ABRT "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 )) s"; grep -v 'Warning\|warn(' "$OUT/$name.log" | grep '^{\|Error\|error\|passed\|failed' | cut -c1-400 | tail -12; }
step kernels_split ${T_TESTS:-25} python3 -m pytest -q -x tests/gpu/test_kernels.py \
  -k "tuned_tile or split_local or group_partials"
step scale_local ${T_SCALE:-115} python3 bench/scale_latency.py --local --model preset:bench-moge --device cuda \
  --dtype bfloat16 --gpus-per-worker 1 --standby 1 --sources device,object_store --concurrency 8 --steady-s 3 \
  --settle-s 2 --stage-timeout-s 40 --deadline-s 110 --out "$OUT/scale_local.json"
python3 - "$OUT/scale_local.json" <<'PY' 2>/dev/null || true
import json, sys
d = json.load(open(sys.argv[1]))
print({k: d.get(k) for k in ("failed_requests", "token_mismatches", "requests_before_any_scaling",
                             "token_mismatches_before_any_scaling", "baseline_new_replica_s")})
for r in d.get("runs", []):
    for k in ("scale_up", "scale_down"):
        o = r[k]
        print(r["source"], k, o.get("to_serving_s"), o.get("share_of_steady_during"), o.get("timeline_s"))
PY
