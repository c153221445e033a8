"""The routed-expert kernel against a token-by-token loop, LocalExperts, and deterministic
per-group random weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.model.experts import group_forward
from actors.model.local_experts import LocalExperts
from actors.weights.loader import random_expert_groups
from actors.model.presets import PRESETS
from actors.model.routing import route

CFG = PRESETS["tiny-moge"]


def _naive(w13, w2, x, local_ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(local_ids.shape[1]):
            e = int(local_ids[t, slot])
            if 0 <= e < w13.shape[0]:
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += weights[t, slot] * (w2[e] @ (F.silu(gate) * up))
    return out


def test_group_forward_matches_token_loop_and_ignores_other_groups_ids():
    gen = torch.Generator().manual_seed(0)
    eg, d, inner, t = 4, 32, 24, 19
    w13 = torch.randn(eg, 2 * inner, d, generator=gen) / d**0.5
    w2 = torch.randn(eg, d, inner, generator=gen) / inner**0.5
    x = torch.randn(t, d, generator=gen)
    ids = torch.randint(-3, eg + 3, (t, 3), generator=gen)  # some ids belong to other groups
    weights = torch.rand(t, 3, generator=gen)
    torch.testing.assert_close(group_forward(w13, w2, x, ids, weights), _naive(w13, w2, x, ids, weights))


def test_group_forward_with_no_tokens_for_the_group_is_zero():
    w13, w2 = torch.randn(2, 8, 4), torch.randn(2, 4, 4)
    y = group_forward(w13, w2, torch.randn(5, 4), torch.full((5, 1), 7), torch.ones(5, 1))
    assert torch.equal(y, torch.zeros(5, 4))


def test_local_experts_sums_groups_and_refuses_missing_groups():
    groups = random_expert_groups(CFG, range(CFG.n_groups), seed=3)
    x = torch.randn(6, CFG.hidden_size)
    ids, weights = route(CFG, torch.randn(6, CFG.n_experts), None)
    y = LocalExperts(CFG, groups).dispatch(0, x, ids, weights).wait()
    expected = sum(
        group_forward(g.w13[0], g.w2[0], x, ids - g.first_expert, weights) for g in groups.values()
    )
    torch.testing.assert_close(y, expected)
    partial = LocalExperts(CFG, {0: groups[0]})
    try:
        partial.dispatch(0, x, ids, weights)
    except KeyError as e:
        assert "1" in str(e)
    else:
        raise AssertionError("LocalExperts computed without the groups it needs")


def test_random_expert_groups_do_not_depend_on_which_other_groups_are_built():
    alone = random_expert_groups(CFG, [2], seed=7)[2]
    together = random_expert_groups(CFG, [0, 2, 3], seed=7)[2]
    other_seed = random_expert_groups(CFG, [2], seed=8)[2]
    neighbour = random_expert_groups(CFG, [1], seed=7)[1]
    assert alone.first_expert == 2 * CFG.experts_per_group
    for layer in alone.w13:
        assert torch.equal(alone.w13[layer], together.w13[layer])
        assert torch.equal(alone.w2[layer], together.w2[layer])
        assert not torch.equal(alone.w13[layer], other_seed.w13[layer])
        assert not torch.equal(alone.w13[layer], neighbour.w13[layer])


def test_group_forward_is_the_same_for_all_slots_or_only_the_groups_slots():
    """What lets an in-process sum and a distributed combine agree bit for bit."""
    groups = random_expert_groups(CFG, [1], seed=5)
    g = groups[1]
    x = torch.randn(9, CFG.hidden_size)
    ids, weights = route(CFG, torch.randn(9, CFG.n_experts) * 3, None)  # MoGE: slot j in group j
    whole = group_forward(g.w13[0], g.w2[0], x, ids - g.first_expert, weights)
    own = group_forward(g.w13[0], g.w2[0], x, ids[:, 1:2] - g.first_expert, weights[:, 1:2])
    assert torch.equal(whole, own) and whole.abs().sum() > 0


def test_stacked_local_experts_match_group_by_group_and_pickle_compactly():
    import pickle

    groups = random_expert_groups(CFG, range(CFG.n_groups), seed=9)
    single = {g: random_expert_groups(CFG, [g], seed=9)[g] for g in range(CFG.n_groups)}
    x = torch.randn(7, CFG.hidden_size)
    ids, weights = route(CFG, torch.randn(7, CFG.n_experts) * 3, None)
    stacked = LocalExperts(CFG, groups)  # consecutive groups: one pass over a stack
    assert stacked.compute.stacked
    expected = torch.zeros(7, CFG.hidden_size)
    for g in single.values():  # what a distributed combine does: partials summed in group order
        expected += group_forward(g.w13[1], g.w2[1], x, ids - g.first_expert, weights)
    torch.testing.assert_close(stacked.dispatch(1, x, ids, weights).wait(), expected, atol=1e-6, rtol=1e-6)
    blob = pickle.dumps(groups[2])
    assert len(blob) < 1.2 * groups[2].nbytes  # a view of the stack ships only its own group
    assert torch.equal(pickle.loads(blob).w13[0], single[2].w13[0])
