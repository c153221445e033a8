"""RMSNorm, optionally with the residual add in front of it, in one pass over each row.

    rms_norm(x, w)            w * (x / rms(x))                    rows of the last dim
    add_rms_norm(h, a, w)     h' = h + a;  (h', w * (h' / rms(h')))

Rounding follows the torch code (actors/model/model.py RMSNorm): the sum h + a is rounded to the
input dtype, the normalised row is computed in float32 and rounded to the input dtype, then
multiplied by the weight and rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x2, res2, weight, eps, out, res_out) -> None:
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    block = triton.next_power_of_2(n_cols)
    warps = 8 if block >= 2048 else 4 if block >= 512 else 1
    has_res = res2 is not None
    _rms_norm_kernel[(n_rows,)](
        x2, res2 if has_res else x2, weight, out, res_out if has_res else out,
        x2.stride(0), res2.stride(0) if has_res else 0, out.stride(0), res_out.stride(0) if has_res else 0,
        n_cols, eps, HAS_RESIDUAL=has_res, BLOCK=block, num_warps=warps,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty_like(x2)
    _launch(x2, None, weight, eps, out, None)
    return out.view(x.shape)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h2, d2 = _rows(h), _rows(delta)
    new_h, out = torch.empty_like(h2), torch.empty_like(h2)
    _launch(h2, d2, weight, eps, out, new_h)
    return new_h.view(h.shape), out.view(h.shape)
