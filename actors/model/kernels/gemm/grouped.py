"""One Triton GEMM for the routed experts (grouped over sorted assignments) and the dense linears.

Shape legend: A = rows of the sorted assignments (tokens x slots), E = experts, N / Kd = output /
input width of a projection, BM = BLOCK_M, NB = M tiles launched.

Grouped: the assignments are sorted by expert (`order`), `ends[e]` is the end row of expert e; the
schedule kernel cuts every expert's rows into tiles of BM and writes, per M tile, its expert and first
row (`blk_expert`, `blk_row`). NB = ceil(A / BM) + E covers any split of A rows among E experts, so
the launch shape follows from the shapes alone; tiles past the last one have expert E and return.
Dense: one "expert", tile m covers rows m*BM.. (no schedule).

Weights `w` [E, N, Kd] (or [N, Kd]) are bf16 (MODE 0) or FP8 with block scales (MODE 1: activations in
the compute dtype, weights converted exactly to it before the dot; MODE 2: activations FP8 too, a scale
per row and 128 columns). In FP8 modes BLOCK_K divides 128, so each K step sits inside one scale
column: acc += dot(a, w) * a_scale[row] * w_scale[n].

Options: GATHER (input row = order[r] // K_SLOTS: x by token, no gathered copy), SCATTER (output row
= order[r]: slot order, for the combine), FUSE_ACT (the gate/up projection: output column n is
silu(gate_n) * up_n from W rows n and N + n, rounded as the unfused path rounds), QUANT_OUT (with
FUSE_ACT and BLOCK_N = 128: the output tile is quantized per row as one activation group, for the
down projection's W8A8), HAS_BIAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from actors.model.kernels.gemm.act_quant import EXACT_ROUNDING, to_e4m3
from actors.model.kernels.gemm.configs import Tile
from actors.model.quant.blocks import BLOCK, FP8, cdiv


@triton.jit
def _schedule_kernel(ends_ptr, blk_expert_ptr, blk_row_ptr, n_experts, n_blocks,
                     BM: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    e = tl.arange(0, E_PAD)
    e_ok = e < n_experts
    end = tl.load(ends_ptr + e, mask=e_ok, other=0)
    start = tl.load(ends_ptr + e - 1, mask=e_ok & (e > 0), other=0)
    nblk = tl.where(e_ok, (end - start + BM - 1) // BM, 0)
    cum = tl.cumsum(nblk, axis=0)  # inclusive: expert e owns tiles [cum - nblk, cum)
    base = start - (cum - nblk) * BM  # first row of tile b of expert e is base + b * BM
    for b0 in range(0, n_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        owner = tl.sum((cum[None, :] <= b[:, None]).to(tl.int32), axis=1)  # E (or more) past the end
        row = tl.sum(tl.where(e[None, :] == owner[:, None], base[None, :], 0), axis=1) + b * BM
        ok = b < n_blocks
        tl.store(blk_expert_ptr + b, tl.minimum(owner, n_experts), mask=ok)
        tl.store(blk_row_ptr + b, row, mask=ok)


def block_schedule(ends: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ends [E] int32 (end row per expert, sorted rows) -> (blk_expert [NB], blk_row [NB], NB)."""
    n_experts = ends.shape[0]
    n_blocks = cdiv(n_rows, block_m) + n_experts
    blk_expert = torch.empty(n_blocks, dtype=torch.int32, device=ends.device)
    blk_row = torch.empty(n_blocks, dtype=torch.int32, device=ends.device)
    _schedule_kernel[(1,)](ends, blk_expert, blk_row, n_experts, n_blocks, BM=block_m,
                           E_PAD=triton.next_power_of_2(n_experts), CHUNK=64, num_warps=4)
    return blk_expert, blk_row, n_blocks


@triton.jit
def _dot(a, w, F32: tl.constexpr):
    if F32:  # float32 tests on CUDA: no TF32 rounding
        return tl.dot(a, w, input_precision="ieee")
    return tl.dot(a, w)


@triton.jit
def _gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, os_ptr, ref_ptr,
    order_ptr, blk_expert_ptr, blk_row_ptr, ends_ptr,
    stride_a, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_out, stride_os,
    n_rows, n_out, n_in, n_experts, split, split_blocks,
    K_SLOTS: tl.constexpr, MODE: tl.constexpr, DENSE: tl.constexpr, GATHER: tl.constexpr,
    SCATTER: tl.constexpr, FUSE_ACT: tl.constexpr, QUANT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EXACT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DENSE:
        e = pid_m * 0
        row0 = pid_m * BLOCK_M
        end = n_rows
    else:
        e = tl.load(blk_expert_ptr + pid_m)
        row0 = tl.load(blk_row_ptr + pid_m)
        end = tl.load(ends_ptr + tl.minimum(e, n_experts - 1))
    if e < n_experts:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        if GATHER:
            src = tl.load(order_ptr + rows, mask=row_ok, other=0) // K_SLOTS
        else:
            src = rows
        src = src.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        kk = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + src[:, None] * stride_a + kk[None, :]
        w_ptrs = w_ptr + e64 * stride_we + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]
        # scale rows of this tile's weight rows (and of its up half) on the split grid
        s_row = tl.where(cols < split, cols // 128, split_blocks + (cols - split) // 128)
        ws_ptrs = ws_ptr + e64 * stride_se + s_row * stride_sn
        if FUSE_ACT:
            ucols = cols + n_out
            wu_ptrs = w_ptr + e64 * stride_we + ucols[None, :].to(tl.int64) * stride_wn + kk[:, None]
            s_row_up = tl.where(ucols < split, ucols // 128, split_blocks + (ucols - split) // 128)
            wsu_ptrs = ws_ptr + e64 * stride_se + s_row_up * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            k_ok = (k0 + kk) < n_in
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptrs + k0, mask=w_mask, other=0.0)
            if FUSE_ACT:
                wu = tl.load(wu_ptrs + k0, mask=w_mask, other=0.0)
            if MODE == 0:
                acc += _dot(a, w, F32)
                if FUSE_ACT:
                    acc_up += _dot(a, wu, F32)
            else:
                kb = k0 // 128
                ws = tl.load(ws_ptrs + kb, mask=col_ok, other=0.0)
                if MODE == 1:
                    acc += _dot(a, w.to(a.dtype), F32) * ws[None, :]
                else:
                    sa = tl.load(as_ptr + src * stride_as + kb, mask=row_ok, other=0.0)
                    acc += tl.dot(a, w) * (sa[:, None] * ws[None, :])
                if FUSE_ACT:
                    wsu = tl.load(wsu_ptrs + kb, mask=col_ok, other=0.0)
                    if MODE == 1:
                        acc_up += _dot(a, wu.to(a.dtype), F32) * wsu[None, :]
                    else:
                        acc_up += tl.dot(a, wu) * (sa[:, None] * wsu[None, :])
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if FUSE_ACT:
            # the unfused path's rounding: h = x @ w13 in the compute dtype, silu(gate) rounded, then the product
            cd = ref_ptr.dtype.element_ty
            g = acc.to(cd).to(tl.float32)
            u = acc_up.to(cd).to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(cd).to(tl.float32)
            y = (silu * u).to(cd).to(tl.float32)
        else:
            y = acc
        if SCATTER:
            dst = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            dst = rows.to(tl.int64)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if QUANT_OUT:  # BLOCK_N == 128: this tile's columns are one activation group of its rows
            amax = tl.max(tl.where(out_mask, tl.abs(y), 0.0), axis=1)
            scale = tl.where(amax > 0, amax / 448.0, 1.0)
            q = to_e4m3(tl.minimum(tl.maximum(y / scale[:, None], -448.0), 448.0), EXACT)
            tl.store(out_ptr + dst[:, None] * stride_out + cols[None, :], q, mask=out_mask)
            tl.store(os_ptr + dst * stride_os + pid_n, scale, mask=row_ok)
        else:
            tl.store(out_ptr + dst[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


def gemm(
    a: torch.Tensor,  # [rows, Kd] (GATHER: [T, Kd] by token) in the compute dtype, or FP8 (MODE 2)
    w: torch.Tensor,  # [E, N', Kd] or [N', Kd]: bf16, or FP8 q (N' = 2N with fuse_act)
    tile: Tile,
    *,
    out_rows: int,
    n_out: int,
    out_dtype: torch.dtype,
    ref: torch.Tensor | None = None,  # any tensor of the compute dtype (default: out_dtype)
    a_scale: torch.Tensor | None = None,  # [rows, ceil(Kd/128)] float32, MODE 2
    w_scale: torch.Tensor | None = None,  # [E, scale rows, ceil(Kd/128)] float32, FP8 modes
    split: int = 0,
    bias: torch.Tensor | None = None,
    order: torch.Tensor | None = None,  # [A] sorted assignment -> slot (grouped)
    schedule: tuple[torch.Tensor, torch.Tensor, int] | None = None,  # block_schedule(...) (grouped)
    ends: torch.Tensor | None = None,  # [E] int32 (grouped)
    k_slots: int = 1,
    gather: bool = False,
    scatter: bool = False,
    fuse_act: bool = False,
    quant_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (out [out_rows, n_out] in out_dtype, or FP8 with quant_out; its scales [out_rows,
    ceil(n_out/128)] with quant_out, else None). Rows no tile writes (other groups' slots with
    scatter) are left as they were allocated."""
    mode = 0 if w.dtype != FP8 else (2 if a.dtype == FP8 else 1)
    dense = schedule is None
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    n_experts, _, n_in = w3.shape
    if quant_out and not (fuse_act and tile.block_n == 128 and mode == 2):
        raise ValueError("quant_out needs fuse_act, W8A8 and BLOCK_N = 128")
    out = torch.empty((out_rows, n_out), dtype=FP8 if quant_out else out_dtype, device=a.device)
    out_scale = torch.empty((out_rows, cdiv(n_out, BLOCK)), dtype=torch.float32, device=a.device) if quant_out else None
    n_rows = a.shape[0]
    if n_rows == 0 or out_rows == 0:
        return out, out_scale
    ws = w_scale if w_scale is not None else w3  # unused pointers get any tensor
    ws3 = ws if ws.dim() == 3 else ws.unsqueeze(0)
    dummy = out
    if dense:
        grid = (triton.cdiv(n_rows, tile.block_m), triton.cdiv(n_out, tile.block_n))
        blk_expert = blk_row = ends_t = order_t = dummy
    else:
        blk_expert, blk_row, n_blocks = schedule
        grid = (n_blocks, triton.cdiv(n_out, tile.block_n))
        ends_t, order_t = ends, order
    _gemm_kernel[grid](
        a, a_scale if a_scale is not None else dummy, w3, ws3, bias if bias is not None else dummy,
        out, out_scale if out_scale is not None else dummy, ref if ref is not None else out,
        order_t, blk_expert, blk_row, ends_t,
        a.stride(0), a_scale.stride(0) if a_scale is not None else 0,
        w3.stride(0), w3.stride(1), ws3.stride(0), ws3.stride(1) if ws3.dim() == 3 else 0,
        out.stride(0), out_scale.stride(0) if out_scale is not None else 0,
        n_rows, n_out, n_in, n_experts, split, cdiv(split, BLOCK),
        K_SLOTS=k_slots, MODE=mode, DENSE=dense, GATHER=gather, SCATTER=scatter, FUSE_ACT=fuse_act,
        QUANT_OUT=quant_out, HAS_BIAS=bias is not None, EXACT=EXACT_ROUNDING,
        F32=a.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.warps, num_stages=tile.stages,
    )
    return out, out_scale
