#!/usr/bin/env bash
# One device-machine call on nvidia-h200-x2 (carry .bundle): the NCCL group-copy GPU test, then
# scale_latency in the one-device case (replica holds every bench-moge group on GPU A; 1 -> 2 -> 1
# moves half the groups to a worker on GPU B) comparing the device lane with the object-store
# path in one run, then the worker-to-worker case (1 -> 2 workers) with both paths. JSON under $OUT.
# Each step has its own timeout; the whole stays under 8 minutes.
#   bash bench/gpu_elastic.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=.bundle; [ -d "$B" ] || B=../../.bundle  # run from the repo root or from .dev/<name> (devsync)
if [ -d "$B" ] && [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && tar -xJf "$B/ray.tar.xz" -C /tmp/site &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$B"/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, ray; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "ray", ray.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m protos.generate || exit 1
quiet() { grep -v '^\[\|WARNING\|INFO\|socket.cpp' | tail -${1:-40}; }

timeout 120 python3 -m pytest -q -x tests/gpu/test_group_copy_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_test_group_copy.txt"

# 1 <-> 2 GPUs, replica-local groups: device lane vs object store (the replica is no Ray actor, so
# its object-store scale-up falls back to the checkpoint; the scale-down uses the object store)
timeout 200 python3 bench/scale_latency.py --local --model preset:bench-moge --device cuda --dtype bfloat16 \
  --gpus-per-worker 1 --standby 1 --sources device,object_store --concurrency 8 --steady-s 4 --settle-s 3 \
  --stage-timeout-s 90 --deadline-s 190 --out "$OUT/scale_local.json" 2>&1 | quiet 20

# worker -> worker (1 -> 2 workers, one GPU each, the second a warm standby; the replica shares a GPU
# with w0): device vs object store
timeout 200 python3 bench/scale_latency.py --model preset:bench-moge --device cuda --dtype bfloat16 \
  --from-workers 1 --gpus-per-worker 1 --standby 1 --sources device,object_store --concurrency 8 --steady-s 4 --settle-s 3 \
  --stage-timeout-s 90 --deadline-s 190 --out "$OUT/scale_workers.json" 2>&1 | quiet 20
ls -l "$OUT"
