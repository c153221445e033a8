#!/usr/bin/env bash
# The NCCL data plane on 2 GPUs (nvidia-h200-x2), in one device call; carry .bundle (Ray, pydantic).
#   bash bench/gpu_dataplane.sh            # everything; results under $OUT
# 1. GPU test: NCCL step lane tokens == single-process (tiny-moge, Qwen3-MoE; with/without ping-pong)
# 2. no Ray: torch.distributed NCCL p2p per layer eager vs CUDA graph; step lane vs monolithic engine
# 3. Ray: bench/dataplane.py, attention GPU0 and all groups GPU1, collective vs collective+lane
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .bundle ] && [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && tar -xJf .bundle/ray.tar.xz -C /tmp/site &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bundle/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m protos.generate || exit 1
timeout 150 python3 -m pytest -q -x tests/gpu/test_step_lane_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_test.txt"
timeout 60 python3 bench/nccl_lane.py p2p --batch-sizes 1,64,256 --out "$OUT/p2p.json" 2>&1 | grep -v Warning | tail -8
timeout 240 python3 bench/nccl_lane.py engine --preset bench-moge --batch-sizes ${BATCHES:-1,64,128,256} \
  --steps 15 --out "$OUT/engine.json" 2>&1 | grep -v Warning | tail -20
timeout 500 python3 bench/dataplane.py --preset bench-moge --batch-sizes ${BATCHES:-1,64,128,256} \
  --transports collective,collective+lane --workers 1 --replica-gpus 1 --worker-gpus 1 \
  --out "$OUT/dataplane.json" 2>&1 | grep -v 'WARNING\|INFO' | tail -25
