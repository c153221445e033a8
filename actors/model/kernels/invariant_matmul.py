"""Matmuls of `engine.batch_invariant` on CUDA: dense (projections, router, shared experts, LM head)
and grouped (routed experts), each output element reduced in one order whatever the number of rows.

Shape legend: M = rows, K = input width, N = output width, E = experts held, A = (token, slot)
assignments, I = expert width, S = K splits.

Why not cuBLAS / torch._grouped_mm: they choose a kernel per problem shape, M included (split-K for
few rows, GEMV-like kernels for one), and the MoE path switches from a GEMV to a grouped GEMM at a
token count; each choice sums a row differently. Here one compiled kernel per (N, K, dtype) serves
every M: the tile config comes from (N, K) only (`config`), the K loop runs in one order, tiles of
rows never interact (an MMA computes each row of its tile the same way), and a K split, where
(N, K) asks for one to fill the device with few rows, is fixed per (N, K) and its partials are
added in ascending order by a second launch. Rows of the grouped kernel are one expert's
assignments, padded to whole tiles: a row's bits do not depend on which other rows share its
expert, in which order, or how the tokens were grouped into calls (stacked or per group).

Cost model (docs/performance.md): decode rows are few, so the weights' bytes bound these matmuls;
configs aim at >= 128 programs per matmul for that. A config is slower than a shape-tuned one at
prefill sizes (one BLOCK_M for all M); the GPU benchmark measures both.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 128  # about one per SM of an H100/H200 with a single row tile


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    k_per_split: int  # a multiple of block_k; K / k_per_split splits
    splits: int


@functools.cache
def config(n: int, k: int, dtype: torch.dtype, grouped: bool = False) -> Config:
    """The one tile config of an (N, K) matmul: never a function of M."""
    block_k = 32 if dtype == torch.float32 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if grouped:  # rows come per expert: several experts' tiles already fill the device
        block_n = 32 if n <= 1024 else 64
        return Config(64, min(block_n, max(16, triton.next_power_of_2(n))), block_k, triton.cdiv(k, block_k) * block_k, 1)
    block_n = 128 if n >= 128 * TARGET_PROGRAMS else 64 if n >= 64 * TARGET_PROGRAMS else 32
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    tiles = triton.cdiv(n, block_n)
    splits = 1
    # split K only where the weight is large enough for its streaming to outweigh the extra launch
    while n * k >= 1 << 21 and tiles * splits * 4 < TARGET_PROGRAMS * 3 and k // (2 * splits) >= 512 and splits < 8:
        splits *= 2
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return Config(64, block_n, block_k, k_per_split, triton.cdiv(k, k_per_split))


@triton.jit(do_not_specialize=["m"])
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
    m, n, k, k_per_split, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """out [M, N] = x [M, K] @ w[N, K]^T (+ bias); with SPLIT, K split s -> part[s] in float32.
    Row tiles are the fast grid axis: the programs that read one weight tile run together (L2)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    kk = tl.arange(0, BLOCK_K)
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + kk
        k_ok = ks < hi
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + (split * m + rows[:, None]) * n + cols[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["m"])
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, m, n, stride_om,
                       SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    acc = tl.load(part_ptr + row * n + cols, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):  # ascending split order
        acc += tl.load(part_ptr + (s * m + row) * n + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), x [..., K], weight [N, K]; rows in any number, same bits per row.
    cfg: the tile config (default `config(N, K)`; tests pass small split configs)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, n = x2.shape[0], w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        cfg = cfg or config(n, k, w.dtype)
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.splits)
        split = cfg.splits > 1
        part = torch.empty((cfg.splits, m, n), dtype=torch.float32, device=x.device) if split else out
        has_bias = bias is not None
        _linear_kernel[grid](
            x2, w, bias if has_bias else w, out, part,
            m, n, k, cfg.k_per_split, x2.stride(0), w.stride(0), out.stride(0),
            HAS_BIAS=has_bias, SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            IEEE=x.dtype == torch.float32, num_warps=4, num_stages=3,
        )
        if split:
            block = min(1024, triton.next_power_of_2(n))
            _sum_splits_kernel[(m, triton.cdiv(n, block))](
                part, bias if has_bias else part, out, m, n, out.stride(0),
                SPLITS=cfg.splits, HAS_BIAS=has_bias, BLOCK=block, num_warps=4,
            )
    return out.view(*lead, n)


# ---- grouped (routed experts) ----------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows"])
def _grouped_kernel(
    in_ptr, w_ptr, out_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    n_rows, n_out, n_in, n_experts, stride_in, stride_we, stride_wn, stride_out,
    K: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """Rows are assignments sorted by expert. GATED: out[r, :I] = silu(x_t · gate_e) * (x_t · up_e)
    with t = order[r] // K and w = w13 [E, 2I, D]; else out[r] = in[r] · w2_e. One tile: BLOCK_M
    rows of one expert (tile_row: its first row; expert_end: that expert's last row + 1)."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e < n_experts:
        r0 = tl.load(tile_row_ptr + tile)
        r_end = tl.load(expert_end_ptr + e)
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        if GATED:
            src = tl.load(order_ptr + rows, mask=row_ok, other=0) // K
        else:
            src = rows
        src = src.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        kk = tl.arange(0, BLOCK_K)
        w_base = w_ptr + e.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + kk
            k_ok = ks < n_in
            a = tl.load(in_ptr + src[:, None] * stride_in + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wmask = col_ok[:, None] & k_ok[None, :]
            b = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=wmask, other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            if GATED:
                bu = tl.load(w_base + (n_out + cols)[:, None] * stride_wn + ks[None, :], mask=wmask, other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, tl.trans(bu), acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, tl.trans(bu), acc_up)
        dtype = out_ptr.dtype.element_ty
        if GATED:  # rounding as torch: gate and up rounded, silu(gate) rounded, then the product
            gate = acc.to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            acc = silu * acc_up.to(dtype).to(tl.float32)
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(dtype), mask=mask)


def grouped_swiglu(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D] gate rows, then up
    w2: torch.Tensor,  # [E, D, I]
    local_ids: torch.Tensor,  # [T, K] int64; outside [0, E) = not computed here
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ys [A, D] per-slot expert outputs in expert-sorted order, rows [A]: the row of ys that
    holds slot a = t * K + k). Device-side, shapes from the inputs' shapes: CUDA-graph safe."""
    t, k = local_ids.shape
    n_experts, two_i, d = w13.shape
    inner = two_i // 2
    flat = local_ids.reshape(-1)
    a = flat.numel()
    ys = torch.empty((a, d), dtype=x.dtype, device=x.device)
    rows = torch.empty_like(flat)
    if a == 0:
        return ys, rows
    key = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    key, order = torch.sort(key, stable=True)
    rows[order] = torch.arange(a, device=x.device)
    cfg13 = config(inner, d, w13.dtype, grouped=True)
    cfg2 = config(d, inner, w2.dtype, grouped=True)
    bm = cfg13.block_m
    experts = torch.arange(n_experts, device=x.device, dtype=key.dtype)
    starts = torch.searchsorted(key, experts)  # [E] first sorted row of each expert
    ends = torch.searchsorted(key, experts, right=True)
    tiles = (ends - starts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(a, bm) + n_experts  # every expert adds at most one partial tile
    tile_id = torch.arange(max_tiles, device=x.device, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, tile_id, right=True)  # E = past the last tile
    e_safe = tile_expert.clamp(max=n_experts - 1)
    tile_row = starts[e_safe] + (tile_id - (tile_end - tiles)[e_safe]) * bm
    act = torch.empty((a, inner), dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    _grouped_kernel[(max_tiles, triton.cdiv(inner, cfg13.block_n))](
        x, w13, act, order, tile_expert, tile_row, ends,
        a, inner, d, n_experts, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        K=k, GATED=True, BLOCK_M=bm, BLOCK_N=cfg13.block_n, BLOCK_K=cfg13.block_k, IEEE=ieee,
        num_warps=4, num_stages=3,
    )
    _grouped_kernel[(max_tiles, triton.cdiv(d, cfg2.block_n))](
        act, w2, ys, order, tile_expert, tile_row, ends,
        a, d, inner, n_experts, act.stride(0), w2.stride(0), w2.stride(1), ys.stride(0),
        K=k, GATED=False, BLOCK_M=bm, BLOCK_N=cfg2.block_n, BLOCK_K=cfg2.block_k, IEEE=ieee,
        num_warps=4, num_stages=3,
    )
    return ys, rows
