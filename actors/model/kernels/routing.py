"""The router's tail in one launch: softmax over the N expert logits, then the kept experts.

Shape legend: T = tokens, N = experts, G = groups, Eg = N / G, K = experts kept per token.

One program per token. MoGE: the probabilities are viewed [G, Eg] and the top K/G of every group are
picked by K/G rounds of a per-group argmax (largest first, as torch.topk orders them), then scaled by
the learned per-expert scale. Top-k: G = 1 and K rounds over all N, optionally renormalised.
Outputs match actors/model/routing.py: ids [T, K] int64 ordered by group, weights [T, K] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, scale_ptr, ids_ptr, w_ptr, stride_l,
    G: tl.constexpr, EG: tl.constexpr, KG: tl.constexpr, G_PAD: tl.constexpr, EG_PAD: tl.constexpr,
    KG_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, RENORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    grp = tl.arange(0, G_PAD)
    col = tl.arange(0, EG_PAD)
    inside = (grp[:, None] < G) & (col[None, :] < EG)
    expert = grp[:, None] * EG + col[None, :]  # [G_PAD, EG_PAD] global expert id
    x = tl.load(logits_ptr + t * stride_l + expert, mask=inside, other=float("-inf")).to(tl.float32)
    x = x - tl.max(tl.max(x, axis=1), axis=0)
    e = tl.where(inside, tl.exp(x), 0.0)
    probs = e / tl.sum(tl.sum(e, axis=1), axis=0)
    probs = tl.where(inside, probs, -1.0)  # never picked

    K: tl.constexpr = G * KG
    total = tl.zeros([G_PAD], tl.float32)
    for r in tl.static_range(KG):
        best = tl.max(probs, axis=1)  # [G_PAD]
        pick = tl.argmax(probs, axis=1)  # first of equal maxima
        ids = grp * EG + pick
        w = best
        if HAS_SCALE:
            w = w * tl.load(scale_ptr + ids, mask=grp < G, other=0.0).to(tl.float32)
        total += tl.where(grp < G, w, 0.0)
        out = t * K + grp * KG + r
        tl.store(ids_ptr + out, ids.to(tl.int64), mask=grp < G)
        tl.store(w_ptr + out, w, mask=grp < G)
        probs = tl.where(col[None, :] == pick[:, None], -1.0, probs)
    if RENORM:
        s = tl.sum(total, axis=0)
        tl.debug_barrier()  # the stores above, read back below by other threads
        r2 = tl.arange(0, KG_PAD)
        ww = tl.load(w_ptr + t * K + r2, mask=r2 < KG)  # G == 1 for renormalising routers
        tl.store(w_ptr + t * K + r2, ww / s, mask=r2 < KG)


def route(
    logits: torch.Tensor,  # [T, N]
    n_groups: int,
    k_per_group: int,
    router_scale: torch.Tensor | None,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, n = logits.shape
    k = n_groups * k_per_group
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    if t == 0:
        return ids, weights
    assert not renormalize or n_groups == 1
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    eg = n // n_groups
    _route_kernel[(t,)](
        logits, router_scale if router_scale is not None else logits, ids, weights, logits.stride(0),
        G=n_groups, EG=eg, KG=k_per_group, G_PAD=triton.next_power_of_2(n_groups),
        EG_PAD=triton.next_power_of_2(eg), KG_PAD=triton.next_power_of_2(k_per_group), HAS_SCALE=router_scale is not None, RENORM=renormalize,
        num_warps=1 if n <= 256 else 4,
    )
    return ids, weights
