"""Fused kernels for the model's hot path on CUDA, written in Triton (which ships with CUDA builds
of torch). Each op here has the plain torch code it replaces beside it as the fallback, which is what
CPU and NPU run (bit for bit what the model always computed there).

Why our own Triton and not a kernel library: FlashInfer and flash-attn ship CUDA builds of several
hundred MB that do not install on the benchmark machine (no registry there, 64 MiB per transfer), and
none of them covers MoGE routing; Triton kernels are plain Python, compile on the device, run in a CUDA
graph and can be checked on a CPU with TRITON_INTERPRET=1.

gemm/ holds the GEMMs over block-scaled FP8 (and the tuned bf16 grouped path): their torch fallbacks
are the dequantizing code in actors/model/quant/linear.py and actors/model/experts.py.

`fused(x)` decides per call: CUDA tensor, Triton importable, not switched off. MOGE_FUSED_KERNELS=0
in the environment (or set_enabled(False)) switches every op back to torch, e.g. to measure.

`batch_invariant()` is the process's `engine.batch_invariant` mode (set_batch_invariant: by the
engine's builder and by an expert worker from its model spec; a process serves one model in one
mode): every op then gives a row the same bits whatever else is in its batch
(kernels/invariant.py says how, op by op).
"""

from __future__ import annotations

import functools
import os

import torch

_enabled = os.environ.get("MOGE_FUSED_KERNELS", "1") != "0"
# Tests only: run the Triton path on CPU tensors too (with TRITON_INTERPRET=1), so the model's use of
# every kernel is checked on a machine without a GPU.
_on_cpu = False
_batch_invariant = False


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def set_enabled(on: bool, on_cpu: bool = False) -> None:
    global _enabled, _on_cpu
    _enabled, _on_cpu = on, on_cpu


def set_batch_invariant(on: bool) -> None:
    global _batch_invariant
    _batch_invariant = bool(on)


def batch_invariant() -> bool:
    return _batch_invariant


def fused(x: torch.Tensor) -> bool:
    """Run the Triton version of an op on x? Only on CUDA: elsewhere the torch fallback."""
    return _enabled and (x.is_cuda or (_on_cpu and x.device.type == "cpu")) and triton_available()


def power_of_two(n: int) -> bool:
    """Head dims the RoPE and decode-attention kernels take (tl.arange sizes)."""
    return n >= 16 and n & (n - 1) == 0
