"""Routed experts for few tokens with block-scaled FP8 weights, activations in the compute dtype: one
program per (token, expert) assignment and tile of output rows, as kernels/moe.py's expert_gemv,
reading each weight byte once per assignment (half the bytes of bf16).

Per weight row the product is summed per 128-column scale block, multiplied by that block's scale
and added to the row's sum, block after block in order (KB blocks unrolled per loop step), so every
autotuned tile shape reduces a row the same way and gives the same bits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from actors.model.kernels.activation import silu_mul_load
from actors.model.quant.blocks import BLOCK, BlockFp8, cdiv

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KB = 2  # scale blocks per loop step


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, ids_ptr, out_ptr,
    stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_out,
    n_out, n_in, n_experts, split, split_blocks,
    K: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr,
):
    """out[a, n] = Σ_i W[e_a, n, i] · in[a, i], W = q · scale; in = x[a // K] (ACT false) or
    silu(h[a, :n_in]) * h[a, n_in:] (ACT true, x = h [A, 2 n_in])."""
    a = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    e = tl.load(ids_ptr + a)
    acc = tl.zeros([BLOCK_N], tl.float32)
    if (e >= 0) & (e < n_experts):
        if ACT:
            src = x_ptr + a * stride_x
        else:
            src = x_ptr + (a // K) * stride_x
        srow = tl.where(rows < split, rows // 128, split_blocks + (rows - split) // 128)
        w_rows = w_ptr + e * stride_we + rows[:, None].to(tl.int64) * stride_wn
        s_rows = s_ptr + e * stride_se + srow * stride_sn
        for k0 in range(0, n_in, KB * 128):
            for j in tl.static_range(KB):  # one 128-column scale block at a time
                cols = k0 + j * 128 + tl.arange(0, 128)
                col_ok = cols < n_in
                if ACT:
                    inp = silu_mul_load(src, cols, col_ok, n_in)
                else:
                    inp = tl.load(src + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                part = tl.sum(w.to(tl.float32) * inp[None, :], axis=1)
                kb = k0 // 128 + j
                s = tl.load(s_rows + kb, mask=row_ok & (kb * 128 < n_in), other=0.0)
                acc += part * s
    tl.store(out_ptr + a * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


# Tuned once per (rows, width) by the first call (the warm-up before graph capture); BLOCK_N >=
# num_warps, so warps split rows, never a row's reduction: every candidate gives the same bits.
_fp8_gemv_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((16, 4), (8, 4), (32, 4), (32, 8), (4, 4), (64, 8))],
    key=["n_out", "n_in"],
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)(_fp8_gemv_kernel)


def fp8_expert_gemv(inp: torch.Tensor, w: BlockFp8, ids: torch.Tensor, k: int, act: bool,
                    block_n: int | None = None) -> torch.Tensor:
    """inp [T, n_in] (act false) or [A, 2 n_in] (act true); w [E, n_out, n_in] FP8; ids [A] -> [A, n_out]
    in inp.dtype."""
    n_experts, n_out, n_in = w.shape
    a = ids.shape[0]
    out = torch.empty((a, n_out), dtype=inp.dtype, device=inp.device)
    if a == 0:
        return out
    q, s = w.q, w.scale
    args = (inp, q, s, ids, out, inp.stride(0), q.stride(0), q.stride(1), s.stride(0), s.stride(1), out.stride(0),
            n_out, n_in, n_experts, w.split, cdiv(w.split, BLOCK))
    if _INTERPRET or block_n is not None:
        bn = block_n or 16
        _fp8_gemv_kernel[(a, triton.cdiv(n_out, bn))](*args, K=k, ACT=act, BLOCK_N=bn, KB=KB, num_warps=4)
    else:
        _fp8_gemv_tuned[lambda meta: (a, triton.cdiv(n_out, meta["BLOCK_N"]))](*args, K=k, ACT=act, KB=KB)
    return out
