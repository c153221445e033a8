"""SiLU-and-multiply: silu(gate) * up in one pass (the middle of every SwiGLU).

gate and up may be two views of one [A, 2I] tensor (a fused gate/up projection) or two tensors.
Rounding follows torch: silu(gate) is rounded to the dtype, then the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_mul_load(src, cols, col_ok, n_in):
    """silu(gate) * up of one row h = [gate (n_in) | up (n_in)] at `cols`, rounded as silu_mul rounds,
    as float32: the input of a down projection that folds the activation into its loads."""
    gate = tl.load(src + cols, mask=col_ok, other=0.0)
    up = tl.load(src + n_in + cols, mask=col_ok, other=0.0).to(tl.float32)
    gf = gate.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype).to(tl.float32)
    return (silu * up).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [A, I] (row-major rows, any row stride) -> [A, I] contiguous."""
    rows, cols = gate.shape
    out = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), cols, BLOCK=block, num_warps=4
    )
    return out
