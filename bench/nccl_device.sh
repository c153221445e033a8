#!/usr/bin/env bash
# One device call (nvidia-h200-x2, no Ray): the NCCL step-lane GPU test, the p2p eager-vs-graph
# microbenchmark and the engine comparison. Everything goes to $OUT.
#   bash bench/nccl_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m | head -4 >> "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())' | tee -a "$OUT/gpu.txt"
timeout 60 python3 bench/nccl_lane.py p2p --batch-sizes 1,64,256 --out "$OUT/p2p.json" 2>&1 | grep -v Warning | tail -12 | tee "$OUT/p2p.txt"
timeout 100 python3 -m pytest -q -x tests/gpu/test_step_lane_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_test.txt"
timeout 150 python3 bench/nccl_lane.py engine --preset bench-moge --batch-sizes ${BATCHES:-1,64,128,256} \
  --steps 10 --out "$OUT/engine.json" 2>&1 | grep -v Warning | tail -30 | tee "$OUT/engine.txt"
