import random

import pytest

from actors.experts.placement import Placement, groups_of, pack_groups, plan_groups, split_rows


def workers(d):
    return [f"w{i}" for i in range(d)]


@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 12, 16])
def test_every_group_held_and_load_even(g, d):
    p = pack_groups(g, workers(d), epoch=3)
    assert p.epoch == 3 and p.n_groups == g
    assert all(p.holders_of(k) for k in range(g))
    per_worker = [len(p.groups_of(w)) for w in workers(d)]
    if d <= g:
        # packing: nobody idle, sizes differ by at most one, each group on exactly one worker
        assert min(per_worker) >= 1 and max(per_worker) - min(per_worker) <= 1
        assert all(len(p.holders_of(k)) == 1 for k in range(g))
    else:
        # replication: one group per worker, replica counts differ by at most one
        assert per_worker == [1] * d
        counts = [len(p.holders_of(k)) for k in range(g)]
        assert max(counts) - min(counts) <= 1 and sum(counts) == d
    assert set(p.workers) == set(workers(d))


def check_rule(g, d, m):
    """The one placement rule, whatever map it started from."""
    assert set(m) == set(range(g)) and all(m[k] for k in range(g)), "every group held"
    per_worker = {w: sum(w in hs for hs in m.values()) for w in workers(d)}
    assert min(per_worker.values()) >= 1, "no worker idle"
    assert max(per_worker.values()) - min(per_worker.values()) <= 1, "loads within one group"
    counts = [len(m[k]) for k in range(g)]
    if d <= g:
        assert counts == [1] * g
    else:  # replication beyond G: one group per device, each group on D // G or D // G + 1 devices
        assert list(per_worker.values()) == [1] * d
        assert max(counts) - min(counts) <= 1 and sum(counts) == d


@pytest.mark.parametrize("g", range(1, 9))
def test_one_rule_for_every_g_and_d(g):
    rng = random.Random(g)
    for d in range(1, 2 * g + 1):
        blank = plan_groups(g, workers(d))
        check_rule(g, d, blank)
        assert groups_of(pack_groups(g, workers(d))) == blank  # data-plane start == controller
        # from any earlier map (another device count, a shuffled worker order), same guarantees
        for _ in range(3):
            before = plan_groups(g, rng.sample(workers(2 * g), rng.randint(1, 2 * g)))
            check_rule(g, d, plan_groups(g, workers(d), before))


@pytest.mark.parametrize("g,d", [(2, 3), (4, 6)])
def test_start_and_controller_agree_where_they_once_differed(g, d):
    # the data plane's pack_groups and the controller's blank-map plan once disagreed here
    p = pack_groups(g, workers(d))
    assert groups_of(p) == plan_groups(g, workers(d), {})
    assert p.holders_of(0) == tuple(workers(d)[0::g])


def test_packing_is_contiguous_and_deterministic():
    p = pack_groups(8, ["a", "b", "c"])
    assert p.by_worker() == {"a": (0, 1, 2), "b": (3, 4, 5), "c": (6, 7)}
    assert pack_groups(8, ["a", "b", "c"]) == p


def test_replication_beyond_g():
    p = pack_groups(2, ["a", "b", "c", "d", "e"])
    assert p.holders_of(0) == ("a", "c", "e")
    assert p.holders_of(1) == ("b", "d")


def test_round_trip_through_dict():
    p = pack_groups(4, workers(6), epoch=9)
    assert Placement.from_dict(p.to_dict()) == p


def test_invalid_inputs():
    with pytest.raises(ValueError):
        pack_groups(4, [])
    with pytest.raises(ValueError):
        pack_groups(4, ["a", "a"])
    with pytest.raises(ValueError):
        pack_groups(0, ["a"])
    with pytest.raises(ValueError, match="no holder"):
        Placement(0, (("a",), ()))


@pytest.mark.parametrize("n,k", [(0, 1), (1, 3), (7, 3), (256, 5), (10, 10)])
def test_split_rows_covers_everything_once(n, k):
    parts = split_rows(n, k)
    assert len(parts) == k
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1
