"""Per-head RMSNorm (optional, Qwen3's q/k norm), rotary embedding and the KV-cache write of the new
tokens, in one launch per layer.

Shape legend: T = new tokens, H / Hkv = query / KV heads, Dh = head dim, S = cache slots (NB * BS).

One program per (token, head) of H + Hkv heads: a query head is normed and rotated in place; a KV head
has its key normed, rotated and written to the cache at the token's slot, and its value copied there.
RoPE is the rotate-half convention; cos/sin are computed here from the position (float32), so no
per-step tables are built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope(x_ptr, w_ptr, cos, sin, eps, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """-> the two rotated halves (float32) of the head at x_ptr."""
    i = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + i)
    x2 = tl.load(x_ptr + HALF + i)
    dtype = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF)
        r = tl.rsqrt(var + eps)
        w1 = tl.load(w_ptr + i).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i).to(tl.float32)
        a = (w1 * (a * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        b = (w2 * (b * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _qk_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, qw_ptr, kw_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,
    eps,
    H: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i)
    cos = tl.cos(freq)
    sin = tl.sin(freq)
    if head < H:
        base = q_ptr + t * stride_qt + head * stride_qh
        o1, o2 = _norm_rope(base, qw_ptr, cos, sin, eps, HALF, HAS_NORM)
        tl.store(base + i, o1.to(q_ptr.dtype.element_ty))
        tl.store(base + HALF + i, o2.to(q_ptr.dtype.element_ty))
    else:
        kh = head - H
        slot = tl.load(slot_ptr + t).to(tl.int64)
        o1, o2 = _norm_rope(k_ptr + t * stride_kt + kh * stride_kh, kw_ptr, cos, sin, eps, HALF, HAS_NORM)
        dst = k_cache_ptr + slot * stride_cs + kh * stride_ch
        tl.store(dst + i, o1.to(k_cache_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, o2.to(k_cache_ptr.dtype.element_ty))
        j = tl.arange(0, 2 * HALF)
        v = tl.load(v_ptr + t * stride_vt + kh * stride_vh + j)
        tl.store(v_cache_ptr + slot * stride_cs + kh * stride_ch + j, v.to(v_cache_ptr.dtype.element_ty))


def qk_rope_store(
    q: torch.Tensor,  # [T, H, Dh], rotated in place
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    positions: torch.Tensor,  # [T]
    inv_freq: torch.Tensor,  # [Dh/2] float32
    q_norm_weight: torch.Tensor | None,  # [Dh]
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [NB, BS, Hkv, Dh]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    t, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if t == 0:
        return
    for x in (q, k, v):
        assert x.stride(2) == 1, "heads must be contiguous in the last dim"
    kc = k_cache.view(-1, kv_heads, head_dim)
    vc = v_cache.view(-1, kv_heads, head_dim)
    has_norm = q_norm_weight is not None
    _qk_rope_store_kernel[(t, heads + kv_heads)](
        q, k, v, positions, inv_freq,
        q_norm_weight if has_norm else inv_freq, k_norm_weight if has_norm else inv_freq,
        kc, vc, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1),
        eps,
        H=heads, HALF=head_dim // 2, HAS_NORM=has_norm, num_warps=1,
    )
