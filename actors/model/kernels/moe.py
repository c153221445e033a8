"""Routed experts on CUDA with no host synchronisation and fixed launch shapes (CUDA-graph safe).

Shape legend: T = tokens, D = hidden, I = expert width, E = experts held, K = slots per token,
A = T * K (token, slot) assignments, G = groups held, Eg = experts per group.

Two ways to the per-slot outputs ys [A, D], then one combine:

- GEMV (few tokens, or any dtype that torch._grouped_mm does not take): one program per assignment
  and tile of output rows reads that expert's weight rows once and dots them with the token; the
  SiLU-and-multiply is folded into the down projection's loads. No sort, three launches in all. An
  expert hit by several tokens is read once per token, so this is for small batches.
- Grouped (bf16, more tokens): assignments sorted by expert, torch._grouped_mm over device-side
  offsets, the Triton SiLU-and-multiply between the two projections.

The combine computes, per token, Σ_g dtype(Σ_{slot in g} weight · y) summed in float32 in ascending
group order and rounded to the dtype: the arithmetic of LocalExperts' per-group partials and of the
distributed combine, in one launch instead of a few per group.

With `engine.batch_invariant` neither way runs: the GEMV/grouped cut-over changes a slot's bits with
the token count, so every count takes kernels/invariant_matmul.py's grouped kernel, then the combine.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from actors.model.kernels import batch_invariant
from actors.model.kernels.activation import silu_mul, silu_mul_load

from actors.model.kernels.gemm.configs import MOE_GEMV_MAX_TOKENS as GEMV_MAX_TOKENS  # noqa: E402
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _expert_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr,
    stride_x, stride_we, stride_wn, stride_out,
    n_out, n_in, n_experts, a_bucket,
    K: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[a, n] = Σ_i w[e_a, n, i] · in[a, i] where in = x[a // K] (ACT false) or
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
        w_rows = w_ptr + e * stride_we + rows[:, None] * stride_wn
        for k0 in range(0, n_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_in
            if ACT:
                inp = silu_mul_load(src, cols, col_ok, n_in)
            else:
                inp = tl.load(src + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * inp[None, :], axis=1)
    tl.store(out_ptr + a * stride_out + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


# Tile shapes tried once per (output rows, input width), at the first call: the engine's warm-up
# before CUDA-graph capture (a worker's warm-up), never inside a capture. Every candidate reduces a
# row the same way, so the choice (timing-dependent, per process) never changes a bit of the result:
# BLOCK_K is fixed (one row is summed in the same 256-wide chunks, in the same order: 8 consecutive
# elements per thread, then across the 32 lanes of a warp) and BLOCK_N >= num_warps (warps split rows,
# never a row). A replica and an expert worker, or a stacked and a per-group call, that tune
# differently still compute identical per-slot outputs (tests/gpu/test_kernels.py checks it). Not
# keyed on the number of assignments either: one tuning per shape, done by the warm-up, none while
# serving.
GEMV_BLOCK_K = 256
_expert_gemv_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": GEMV_BLOCK_K}, num_warps=w)
        for bn, w in ((16, 4), (8, 4), (32, 4), (32, 8), (4, 4), (16, 8))
    ],
    key=["n_out", "n_in"],
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)(_expert_gemv_kernel)


@triton.jit
def _combine_kernel(
    ys_ptr, rows_ptr, ids_ptr, w_ptr, out_ptr,
    stride_y, stride_out, stride_group, n_cols, n_local,
    K: tl.constexpr, K_PAD: tl.constexpr, G: tl.constexpr, EG: tl.constexpr,
    HAS_ROWS: tl.constexpr, PER_GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    # A group's partial is summed slot by slot in slot order (other groups' slots add an exact 0.0),
    # not by a tree over the padded slot axis: a tree pairs the group's slots differently when they
    # sit at other positions or among another number of slots, so the stacked call (every group's
    # slots) and a per-group call (only its own, compacted) would round differently.
    acc = tl.zeros([BLOCK_D], tl.float32)
    for g in tl.static_range(G):
        part = tl.zeros([BLOCK_D], tl.float32)
        for k in tl.static_range(K):
            e = tl.load(ids_ptr + t * K + k)
            mine = (e >= 0) & (e < n_local) & (e // EG == g)
            if HAS_ROWS:
                row = tl.load(rows_ptr + t * K + k).to(tl.int64)
            else:
                row = t * K + k
            w = tl.load(w_ptr + t * K + k)
            y = tl.load(ys_ptr + row * stride_y + cols, mask=col_ok & mine, other=0.0)
            part += tl.where(mine, y.to(tl.float32) * w, 0.0)
        if PER_GROUP:  # out [G, T, D]: each group's partial, for a caller that combines elsewhere
            tl.store(out_ptr + g * stride_group + t * stride_out + cols, part.to(out_ptr.dtype.element_ty),
                     mask=col_ok)
        else:
            acc += part.to(ys_ptr.dtype.element_ty).to(tl.float32)  # a group's partial, in the model dtype
    if not PER_GROUP:
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def expert_gemv(
    inp: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, k: int, act: bool,
    block_n: int | None = None, block_k: int = GEMV_BLOCK_K, num_warps: int = 4,
) -> torch.Tensor:
    """inp [T, n_in] (act false) or [A, 2 n_in] (act true); w [E, n_out, n_in]; ids [A] -> [A, n_out]."""
    n_experts, n_out, n_in = w.shape
    a = ids.shape[0]
    out = torch.empty((a, n_out), dtype=inp.dtype, device=inp.device)
    if a == 0:
        return out
    args = (inp, w, ids, out, inp.stride(0), w.stride(0), w.stride(1), out.stride(0),
            n_out, n_in, n_experts, triton.next_power_of_2(a))
    if _INTERPRET or block_n is not None:  # fixed tiles: the interpreter, tests
        bn = block_n or 16
        _expert_gemv_kernel[(a, triton.cdiv(n_out, bn))](*args, K=k, ACT=act, BLOCK_N=bn, BLOCK_K=block_k, num_warps=num_warps)
    else:
        _expert_gemv_tuned[lambda meta: (a, triton.cdiv(n_out, meta["BLOCK_N"]))](*args, K=k, ACT=act)
    return out


def combine(
    ys: torch.Tensor,  # [rows, D] per-slot expert outputs
    rows: torch.Tensor | None,  # [T*K] row of ys holding slot (t, k); None = row t*K + k
    local_ids: torch.Tensor,  # [T, K], outside [0, E) = not computed here
    weights: torch.Tensor,  # [T, K] float32
    n_local: int,
    experts_per_group: int,
    n_groups: int,
    dtype: torch.dtype,
    per_group: bool = False,
) -> torch.Tensor:
    """[T, D] in dtype: Σ over groups of the group's partial (see the module doc); per_group:
    [G, T, D] in ys' dtype, the partials themselves (what a per-group combine adds up)."""
    t, k = local_ids.shape
    d = ys.shape[1]
    if per_group:
        out = torch.empty((n_groups, t, d), dtype=ys.dtype, device=ys.device)
    else:
        out = torch.empty((t, d), dtype=dtype, device=ys.device)
    if t == 0:
        return out
    block_d = min(512, triton.next_power_of_2(d))
    _combine_kernel[(t, triton.cdiv(d, block_d))](
        ys, rows if rows is not None else local_ids, local_ids, weights.contiguous(), out,
        ys.stride(0), out.stride(-2), out.stride(0) if per_group else 0, d, n_local,
        K=k, K_PAD=triton.next_power_of_2(k), G=n_groups, EG=experts_per_group,
        HAS_ROWS=rows is not None, PER_GROUP=per_group, BLOCK_D=block_d, num_warps=4,
    )
    return out


def grouped_usable(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def fused_moe(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D] gate rows, then up
    w2: torch.Tensor,  # [E, D, I]
    local_ids: torch.Tensor,  # [T, K] int64, ids local to w13; outside [0, E) = not ours
    weights: torch.Tensor,  # [T, K] float32
    experts_per_group: int,
    n_groups: int,
    gemv_max_tokens: int | None = None,
    out_dtype: torch.dtype | None = None,
    per_group: bool = False,
) -> torch.Tensor:
    """[T, D] in out_dtype (default x.dtype): per token Σ over groups of the group's partial (see
    module doc); float32 keeps the sum unrounded, for a caller that adds other partials to it.
    per_group: [n_groups, T, D] in x.dtype, each group's partial (for a combine elsewhere)."""
    out_dtype = out_dtype or x.dtype
    t, k = local_ids.shape
    n_local, two_i, _ = w13.shape
    local_ids = local_ids.contiguous()
    flat = local_ids.view(-1)
    limit = GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens
    if batch_invariant():  # one grouped kernel for every token count (kernels/invariant_matmul.py)
        from actors.model.kernels.invariant_matmul import grouped_swiglu

        ys, rows = grouped_swiglu(x, w13, w2, local_ids)
        return combine(ys, rows, local_ids, weights, n_local, experts_per_group, n_groups, out_dtype, per_group)
    from actors.model.kernels.gemm import moe as gemm_moe  # block-FP8 weights; the tuned bf16 grouped path

    if gemm_moe.takes(w13, x, t, limit):
        ys = gemm_moe.expert_outputs(x, w13, w2, local_ids, gemv_max_tokens=gemv_max_tokens)
        return combine(ys, None, local_ids, weights, n_local, experts_per_group, n_groups, out_dtype, per_group)
    if not grouped_usable(x) or t <= limit:
        h = expert_gemv(x, w13, flat, k, act=False)  # [A, 2I]
        ys = expert_gemv(h, w2, flat, k, act=True)  # [A, D]
        return combine(ys, None, local_ids, weights, n_local, experts_per_group, n_groups, out_dtype, per_group)

    key = torch.where((flat >= 0) & (flat < n_local), flat, n_local)
    key, order = torch.sort(key, stable=True)  # ours first, grouped by expert
    xs = x[order // k]  # [A, D]
    ends = torch.searchsorted(key, torch.arange(1, n_local + 1, device=x.device, dtype=key.dtype))
    offs = ends.to(torch.int32)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [A, 2I]; rows past offs[-1] unwritten
    act = silu_mul(h[:, : two_i // 2], h[:, two_i // 2 :])
    ys = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [A, D]
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=x.device)
    return combine(ys, rows, local_ids, weights, n_local, experts_per_group, n_groups, out_dtype, per_group)
