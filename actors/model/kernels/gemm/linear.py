"""The dense FP8 linear of the attention projections, shared experts and dense MLPs:
y = x W^T + b with W [N, K] block-scaled FP8, x [M, K] in the compute dtype.

Up to dense_w8a8_min_tokens rows the activations stay in the compute dtype (weight-only: the step
reads each weight byte once, and W is converted exactly to the dtype in registers); from there they
are quantized per token group of 128 (act_quant) and the dot runs in FP8 (W8A8). Tiles come from the
table (configs.py).

torch._scaled_mm is not used here: with 128x128 block scales it needs the blockwise scaling recipes
of recent torch builds on sm90 only, which CI cannot check; bench/gemm_autotune.py times it beside
this kernel (where the build has it) so the table can switch when it wins.
"""

from __future__ import annotations

import torch

from actors.model.kernels.gemm import configs
from actors.model.kernels.gemm.act_quant import quantize_act
from actors.model.kernels.gemm.grouped import gemm


def dense_mode(tokens: int) -> str:
    return "w8a8" if tokens >= configs.setting("dense_w8a8_min_tokens") else "wo"


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               mode: str | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype; q [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)]."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], q.shape[0]
    mode = mode or dense_mode(m)
    tile = configs.tile("dense", mode, n, k, m, m)
    if mode == "w8a8":
        xq, xs = quantize_act(x2)
        out, _ = gemm(xq, q, tile, out_rows=m, n_out=n, out_dtype=x.dtype, ref=x2, a_scale=xs, w_scale=scale, bias=bias)
    else:
        out, _ = gemm(x2, q, tile, out_rows=m, n_out=n, out_dtype=x.dtype, w_scale=scale, bias=bias)
    return out.view(*lead, n)
