"""Dynamic activation quantization for W8A8: x [M, K] -> q [M, K] float8_e4m3fn and s [M, ceil(K/128)]
float32, one scale per row and group of 128 columns: s = amax(|x_group|) / 448 (1 for an all-zero
group), q = x / s rounded to nearest even. x ≈ q * s. The torch version (`quantize_act_torch`) is the
reference and the fallback.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from actors.model.quant.blocks import BLOCK, FP8, FP8_MAX, cdiv

# Triton's CPU interpreter casts to float8 with round-half-away and drops a mantissa carry into the
# exponent (31.8 -> 16); there the kernels round to an e4m3 value first so the cast is exact. On the
# GPU the hardware conversion (round to nearest even, saturating) runs.
EXACT_ROUNDING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """float32 x with |x| <= 448 -> float8e4nv, round to nearest even."""
    if EXACT:
        ax = tl.minimum(tl.abs(x), 448.0)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(ax, 1e-30))), -6.0)  # -6: e4m3's subnormal range
        step = tl.exp2(e - 3.0)  # 3 mantissa bits
        v = ax / step
        r = tl.floor(v + 0.5)
        r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # ties to even
        x = tl.where(x < 0, -r * step, r * step)
    return x.to(tl.float8e4nv)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, stride_s, n_cols, EXACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    cols = grp * 128 + tl.arange(0, 128)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    q = to_e4m3(tl.minimum(tl.maximum(x / scale, -448.0), 448.0), EXACT)
    tl.store(q_ptr + row * stride_q + cols, q, mask=ok)
    tl.store(s_ptr + row * stride_s + grp, scale)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows may be strided) -> (q [M, K] fp8, s [M, ceil(K/128)] float32)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    s = torch.empty((m, cdiv(k, BLOCK)), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, cdiv(k, BLOCK))](x, q, s, x.stride(0), q.stride(0), s.stride(0), k,
                                               EXACT=EXACT_ROUNDING, num_warps=1)
    return q, s


def quantize_act_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in torch (reference and fallback)."""
    m, k = x.shape
    g = cdiv(k, BLOCK)
    xf = torch.nn.functional.pad(x.float(), (0, g * BLOCK - k)).view(m, g, BLOCK)
    amax = xf.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, g * BLOCK)[:, :k].contiguous()
    return q, s
