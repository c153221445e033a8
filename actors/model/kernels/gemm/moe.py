"""Routed experts through this package's kernels: block-scaled FP8 weights (any token count), and the
tuned Triton grouped path for bf16 weights (when configs say "triton").

Shape legend as kernels/moe.py: T tokens, K slots, A = T*K, E experts held, D hidden, I expert width.

    few tokens (<= gemv_max_tokens), FP8:  GEMV x -> h [A, 2I], GEMV (SiLU-mul folded in) -> ys [A, D]
    grouped:  sort slots by expert (device), block schedule, gate/up GEMM gathering x by token with
              SiLU-mul (and, W8A8, the activation quantization) in its epilogue -> act [A, I] sorted;
              down GEMM scattering rows back to slot order -> ys [A, D]
    then (the caller, kernels/moe.py's fused_moe) the combine: per token, each group's slots summed in float32 in slot order,
    rounded to the dtype, groups summed in float32 in ascending order.
"""

from __future__ import annotations

import torch

from actors.model.kernels.gemm import configs
from actors.model.kernels.gemm.act_quant import quantize_act
from actors.model.kernels.gemm.fp8_gemv import fp8_expert_gemv
from actors.model.kernels.gemm.grouped import block_schedule, gemm
from actors.model.quant.blocks import BlockFp8


def moe_mode(tokens: int, fp8: bool, gemv_max_tokens: int | None = None) -> str:
    """"gemv", "wo" (grouped, FP8 weights x compute-dtype activations), "w8a8" or "bf16" (grouped)."""
    if not fp8:
        return "bf16"
    limit = configs.setting("gemv_max_tokens") if gemv_max_tokens is None else gemv_max_tokens
    if tokens <= limit:
        return "gemv"
    return "w8a8" if configs.w8a8(tokens) else "wo"


def takes(w13, x: torch.Tensor, tokens: int, gemv_max_tokens: int) -> bool:
    """Does this package compute these routed experts (else kernels/moe.py's own paths)? FP8 weights
    always; bf16 on the grouped path when the table says "triton"."""
    if isinstance(w13, BlockFp8):
        return True
    return (tokens > gemv_max_tokens and x.is_cuda and x.dtype == torch.bfloat16
            and configs.setting("bf16_grouped") == "triton")


def sort_slots(local_ids: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (order [A] int64: sorted row -> slot t*K+k, ours first grouped by expert; ends [E] int32)."""
    flat = local_ids.reshape(-1)
    key = torch.where((flat >= 0) & (flat < n_local), flat, n_local)
    key, order = torch.sort(key, stable=True)
    ends = torch.searchsorted(key, torch.arange(1, n_local + 1, device=key.device, dtype=key.dtype))
    return order, ends.to(torch.int32)


def expert_outputs(
    x: torch.Tensor,  # [T, D]
    w13,  # [E, 2I, D]: BlockFp8 or a bf16 tensor
    w2,  # [E, D, I]
    local_ids: torch.Tensor,  # [T, K] int64, contiguous; outside [0, E) = not ours
    mode: str | None = None,
    gemv_max_tokens: int | None = None,
) -> torch.Tensor:
    """ys [A, D] in x.dtype, row t*K + k = expert_(t,k)(x_t) (unweighted); rows of slots not ours are
    not written. The caller combines (kernels/moe.py's combine)."""
    t, k = local_ids.shape
    fp8 = isinstance(w13, BlockFp8)
    mode = mode or moe_mode(t, fp8, gemv_max_tokens)
    n_local, two_i, d = w13.shape
    inner = two_i // 2
    if mode == "gemv":
        flat = local_ids.view(-1)
        h = fp8_expert_gemv(x, w13, flat, k, act=False)  # [A, 2I]
        return fp8_expert_gemv(h, w2, flat, k, act=True)  # [A, D]

    a = t * k
    order, ends = sort_slots(local_ids, n_local)
    rows_per_block = max(1, a // n_local)
    m_tiles = min(n_local, a)  # about one M tile per expert hit
    t_up = configs.tile("moe_up", mode, inner, d, t, rows_per_block, m_tiles)
    t_down = configs.tile("moe_down", mode, d, inner, t, rows_per_block, m_tiles)
    sched_up = block_schedule(ends, a, t_up.block_m)
    sched_down = sched_up if t_down.block_m == t_up.block_m else block_schedule(ends, a, t_down.block_m)
    q13, s13, split13 = (w13.q, w13.scale, w13.split) if fp8 else (w13, None, 0)
    q2, s2, split2 = (w2.q, w2.scale, w2.split) if fp8 else (w2, None, 0)
    common = dict(order=order, ends=ends, k_slots=k, ref=x, out_rows=a, out_dtype=x.dtype)
    if mode == "w8a8":
        xq, xs = quantize_act(x)
        act, act_s = gemm(xq, q13, t_up, n_out=inner, a_scale=xs, w_scale=s13, split=split13,
                          schedule=sched_up, gather=True, fuse_act=True, quant_out=True, **common)
    else:
        act, act_s = gemm(x, q13, t_up, n_out=inner, w_scale=s13, split=split13,
                          schedule=sched_up, gather=True, fuse_act=True, **common)  # [A, I] sorted rows
    ys, _ = gemm(act, q2, t_down, n_out=d, a_scale=act_s, w_scale=s2, split=split2,
                 schedule=sched_down, scatter=True, **common)  # [A, D] slot rows
    return ys
