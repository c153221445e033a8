"""Routing invariants: MoGE keeps exactly K/G experts in every group with unrenormalised softmax
weights (times the router scale) and so balances groups perfectly; top-k does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.model.presets import PRESETS
from actors.model.routing import expert_load, imbalance_score, moge_route, route, tokens_per_group, topk_route

MOGE = PRESETS["tiny-moge"]  # 16 experts, 4 groups, K = 4 (1 per group)


def _logits(t: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, n, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("k_per_group", [1, 2])
def test_moge_keeps_k_over_g_per_group_with_unrenormalised_softmax(k_per_group):
    cfg = dataclasses.replace(MOGE, top_k=MOGE.n_groups * k_per_group)
    logits = _logits(64, cfg.n_experts)
    scale = torch.linspace(0.5, 1.5, cfg.n_experts)
    ids, weights = route(cfg, logits, scale)
    assert ids.shape == weights.shape == (64, cfg.top_k) and weights.dtype == torch.float32

    groups = ids // cfg.experts_per_group
    for g in range(cfg.n_groups):
        assert torch.equal((groups == g).sum(dim=1), torch.full((64,), k_per_group))

    probs = torch.softmax(logits, dim=-1)
    dense = torch.zeros_like(probs).scatter(1, ids, weights)
    # every kept weight is the global softmax value times the expert's scale, not renormalised ...
    torch.testing.assert_close(weights, probs.gather(1, ids) * scale[ids])
    assert not torch.allclose(weights.sum(dim=1), torch.ones(64))
    # ... and it is the largest k_per_group of its group
    per_group = probs.view(64, cfg.n_groups, cfg.experts_per_group)
    kth = per_group.topk(k_per_group, dim=-1).values[..., -1:]  # [T, G, 1]
    kept = (dense > 0).view_as(per_group)
    assert torch.all(per_group[kept] >= kth.expand_as(per_group)[kept])
    assert torch.all(per_group[~kept] <= kth.expand_as(per_group)[~kept])


def test_moge_without_router_scale_returns_plain_softmax_values():
    logits = _logits(8, 16, seed=1)
    ids, weights = moge_route(logits, n_groups=4, k_per_group=1)
    torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids))


def test_moge_imbalance_score_is_zero():
    ids, _ = route(MOGE, _logits(257, MOGE.n_experts, seed=2), None)
    counts = tokens_per_group(ids, MOGE)
    assert counts.tolist() == [257] * MOGE.n_groups
    assert imbalance_score(counts, 257) == 0.0
    assert expert_load(ids, MOGE.n_experts).sum() == 257 * MOGE.top_k


def test_topk_routing_is_global_and_groups_are_uneven():
    cfg = dataclasses.replace(MOGE, family="mixtral", top_k=2, router_scale=False, renormalize=True)
    logits = _logits(64, cfg.n_experts, seed=3)
    logits[:, :4] += 3.0  # skew toward group 0, as real routers often are
    ids, weights = route(cfg, logits)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(64))
    top2 = torch.softmax(logits, -1).topk(2, dim=-1)
    assert torch.equal(ids, top2.indices)
    counts = tokens_per_group(ids, cfg)
    assert counts[0] > counts[1:].max()
    assert imbalance_score(counts, 64) == pytest.approx((counts.max() - counts.min()).item() / 64)
    assert imbalance_score(counts, 64) > 0


def test_topk_without_renormalisation_keeps_softmax_values():
    logits = _logits(16, 8, seed=4)
    ids, weights = topk_route(logits, 2, renormalize=False)
    torch.testing.assert_close(weights, torch.softmax(logits, -1).gather(1, ids))


def test_imbalance_score_of_empty_step_is_zero():
    assert imbalance_score(torch.zeros(4, dtype=torch.long), 0) == 0.0
