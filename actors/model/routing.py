"""Routing: which experts each token goes to, and with what weight. Pure tensor functions.

Shape legend: T = tokens, N = routed experts, G = expert groups, Eg = N // G experts per group,
K = experts kept per token (MoGE: K = G * K/G).

MoGE (Pangu Pro MoE): softmax over all N, keep the top K/G inside every group, no renormalisation,
then an optional learned per-expert scale. Every group sees every token with exactly K/G experts,
which is what makes the load balanced by construction.
Top-k (Mixtral, Qwen-MoE): softmax over N, keep the global top K, optionally renormalise (Mixtral's
"softmax over the kept logits" is the same thing as softmax-then-renormalise).
"""

from __future__ import annotations

import torch

from actors.model.config import ModelConfig


def moge_route(
    logits: torch.Tensor,  # [T, N]
    n_groups: int,
    k_per_group: int,
    router_scale: torch.Tensor | None = None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [T, K] int64 global expert ids ordered by group, weights [T, K] float32)."""
    t, n = logits.shape
    probs = torch.softmax(logits.float(), dim=-1).view(t, n_groups, n // n_groups)  # [T, G, Eg]
    kept, local = torch.topk(probs, k_per_group, dim=-1)  # [T, G, K/G]
    first = torch.arange(n_groups, device=logits.device).view(1, n_groups, 1) * (n // n_groups)
    ids = (local + first).reshape(t, n_groups * k_per_group)
    weights = kept.reshape(t, n_groups * k_per_group)
    if router_scale is not None:
        weights = weights * router_scale.float()[ids]
    return ids, weights


def topk_route(
    logits: torch.Tensor,  # [T, N]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [T, K] int64, weights [T, K] float32) for Mixtral / Qwen-MoE style routers."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def route(
    cfg: ModelConfig, logits: torch.Tensor, router_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's router on logits [T, N]."""
    if cfg.family == "moge":
        return moge_route(logits, cfg.n_groups, cfg.k_per_group, router_scale)
    return topk_route(logits, cfg.top_k, cfg.renormalize)


def route_fused(
    cfg: ModelConfig, logits: torch.Tensor, router_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` as one Triton launch (CUDA): softmax and the per-group top-K/G in registers."""
    from actors.model.kernels.routing import route as fused

    if cfg.family == "moge":
        return fused(logits, cfg.n_groups, cfg.k_per_group, router_scale, renormalize=False)
    return fused(logits, 1, cfg.top_k, None, renormalize=cfg.renormalize)


def tokens_per_group(topk_ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[G] int64: tokens that a group receives (a token counts once even if it uses several of the
    group's experts) — the rows dispatch sends to the group's holder."""
    t = topk_ids.shape[0]
    groups = topk_ids // cfg.experts_per_group  # [T, K]
    hit = torch.zeros(t, cfg.n_groups, dtype=torch.bool, device=topk_ids.device)
    hit.scatter_(1, groups, True)
    return hit.sum(dim=0)


def expert_load(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[N] int64: (token, expert) assignments per expert."""
    return torch.bincount(topk_ids.reshape(-1), minlength=n_experts)


def imbalance_score(tokens_per_group: torch.Tensor | list[int], num_tokens: int) -> float:
    """IS = (max_g T_g - min_g T_g) / |X| (Pangu Pro MoE, eq. 1); 0 for an empty step."""
    counts = torch.as_tensor(tokens_per_group)
    if num_tokens <= 0 or counts.numel() == 0:
        return 0.0
    return float(counts.max() - counts.min()) / num_tokens
