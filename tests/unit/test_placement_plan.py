"""Planning the next map from the current one: the same rule as at start, with as few group copies
as possible."""

from __future__ import annotations

import pytest

from actors.experts.placement import move_group, moved_groups, pack_groups, plan_groups


def as_map(p):
    return {g: hs for g, hs in enumerate(p.holders)}


def loads(m):
    out = {}
    for g, hs in m.items():
        for w in hs:
            out[w] = out.get(w, 0) + 1
    return out


@pytest.mark.parametrize("path", [[1, 2, 4, 2], [1, 3, 8, 16, 5, 1], [2, 7, 3]])
def test_every_step_is_balanced_and_covers_every_group(path):
    n = 8
    workers = [f"w{i}" for i in range(max(path))]
    current = as_map(pack_groups(n, workers[: path[0]]))
    for d in path[1:]:
        new = plan_groups(n, workers[:d], current)
        assert set(new) == set(range(n)) and all(new[g] for g in range(n))
        per_worker = loads(new)
        assert set(per_worker) == set(workers[:d])
        assert max(per_worker.values()) - min(per_worker.values()) <= 1
        holders = [len(hs) for hs in new.values()]
        assert max(holders) - min(holders) <= 1
        current = new


def test_scale_up_moves_only_what_the_new_workers_take():
    one = as_map(pack_groups(8, ["w0"]))
    two = plan_groups(8, ["w0", "w1"], one)
    assert moved_groups(one, two) == 4
    four = plan_groups(8, ["w0", "w1", "w2", "w3"], two)
    assert moved_groups(two, four) == 4  # pack_groups from scratch would copy 6
    assert moved_groups(two, as_map(pack_groups(8, ["w0", "w1", "w2", "w3"]))) == 6


def test_scale_down_keeps_survivors_groups():
    four = as_map(pack_groups(8, ["w0", "w1", "w2", "w3"]))
    two = plan_groups(8, ["w0", "w1"], four)
    for w in ("w0", "w1"):
        assert set(g for g, hs in four.items() if w in hs) <= set(g for g, hs in two.items() if w in hs)
    assert moved_groups(four, two) == 4


def test_move_and_replicate_one_group():
    m = as_map(pack_groups(4, ["a", "b"]))
    assert move_group(m, 1, "b")[1] == ("b",)
    assert move_group(m, 1, "b", replicate=True)[1] == ("a", "b")
    assert move_group(m, 0, "b")[2] == m[2]
    with pytest.raises(ValueError, match="unknown group"):
        move_group(m, 9, "b")
