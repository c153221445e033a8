"""The dense FP8 linear of the attention projections, shared experts and dense MLPs:
y = x W^T + b with W [N, K] block-scaled FP8, x [M, K] in the compute dtype.

Up to dense_w8a8_over_tokens rows the activations stay in the compute dtype (weight-only: the step
reads each weight byte once, and W is converted exactly to the dtype in registers); above, they
are quantized per token group of 128 (act_quant) and the dot runs in FP8 (W8A8). Tiles come from the
table (configs.py).

With dense_w8a8_backend "scaled_mm" (configs), W8A8 goes to torch's blockwise scaled matmul
(F.scaled_mm, BlockWise1x128 activations x BlockWise128x128 weights: CUTLASS on sm90 in recent
builds) where the shape allows it (N and K multiples of 128). bench/gemm_autotune.py selects it only
after checking its output against this kernel's on the device and timing it faster; the default is
the Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.model.kernels.gemm import configs
from actors.model.kernels.gemm.act_quant import quantize_act
from actors.model.kernels.gemm.grouped import gemm


def dense_mode(tokens: int) -> str:
    return "w8a8" if configs.w8a8(tokens, "dense_w8a8_over_tokens") else "wo"


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               mode: str | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype; q [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], q.shape[0]
    mode = mode or dense_mode(m)
    rows = min(m, 128)
    tile = configs.tile("dense", mode, n, k, m, rows, -(-m // rows))
    if mode == "w8a8" and configs.setting("dense_w8a8_backend") == "scaled_mm" and scaled_mm_fits(q):
        out = scaled_mm_blockwise(x2, q, scale, bias)
    elif mode == "w8a8":
        xq, xs = quantize_act(x2)
        out, _ = gemm(xq, q, tile, out_rows=m, n_out=n, out_dtype=x.dtype, ref=x2, a_scale=xs, w_scale=scale, bias=bias)
    else:
        out, _ = gemm(x2, q, tile, out_rows=m, n_out=n, out_dtype=x.dtype, w_scale=scale, bias=bias)
    return out.view(*lead, n)


def scaled_mm_fits(q: torch.Tensor) -> bool:
    n, k = q.shape
    return q.is_cuda and hasattr(F, "scaled_mm") and n % 128 == 0 and k % 128 == 0


def scaled_mm_blockwise(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 through F.scaled_mm's blockwise recipes: rows padded to a multiple of 4, activation scales
    outer-dim major, weight scales' K blocks padded to a multiple of 4 (its layout rules)."""
    m = x2.shape[0]
    pad = -m % 4
    xq, xs = quantize_act(F.pad(x2, (0, 0, 0, pad)) if pad else x2)
    kb = scale.shape[1]
    s = F.pad(scale, (0, -kb % 4)) if kb % 4 else scale
    out = F.scaled_mm(xq, q.t(), xs.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                      s.t(), F.ScalingType.BlockWise128x128, output_dtype=x2.dtype)[:m]
    return out + bias if bias is not None else out
