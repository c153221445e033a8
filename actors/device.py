"""One place that knows about accelerator kinds: cuda, npu (Ascend, via torch_npu) and cpu.

torch_npu is imported lazily and only when an NPU is asked for or probed, so CUDA and CPU hosts
never need it.
"""

from __future__ import annotations

import functools
import os

import torch

KINDS = ("cuda", "npu", "cpu")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return bool(torch.npu.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then npu, then cpu; a concrete name is checked for availability."""
    if isinstance(name, torch.device):
        return name
    kind = name.split(":")[0]
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if npu_available():
            return torch.device("npu", torch.npu.current_device())
        return torch.device("cpu")
    if kind not in KINDS:
        raise ValueError(f"unknown device {name!r}; expected one of {KINDS} or 'auto'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if kind == "npu" and not npu_available():
        raise RuntimeError("device 'npu' requested but torch_npu is missing or sees no NPU")
    if kind != "cpu" and ":" not in name:
        module = torch.cuda if kind == "cuda" else torch.npu
        return torch.device(kind, module.current_device())
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on accelerators, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected 'auto' or one of {sorted(_DTYPES)}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def sync_stream(device: torch.device) -> None:
    """Wait for this thread's current stream on `device` only. Processes that keep NCCL/HCCL
    receives posted while idle (an expert worker's step lanes) must never synchronize the whole
    device: that waits for a receive only the peer's next step completes."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "npu":
        torch.npu.current_stream(device).synchronize()


def h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued behind the device's work instead of waiting for it: CUDA
    copies from pageable memory first wait for the stream, so the bytes go through pinned memory
    (torch's caching host allocator, which keeps a block until the copy that reads it is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def memory_free(device: torch.device) -> int:
    """Bytes free on the device (host memory available for cpu)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_total(device: torch.device) -> int:
    """Bytes of device memory in all (host memory for cpu)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count() if npu_available() else 0
    return os.cpu_count() or 1


def visible_devices_env(kind: str) -> str | None:
    """The environment variable that restricts a process to some accelerators."""
    return {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES", "cpu": None}[kind]


def collective_backend(kind: str) -> str:
    """torch.distributed backend for the `collective` transport."""
    return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[kind]
