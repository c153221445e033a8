import pytest

from actors.experts.placement import Placement, pack_groups, split_rows


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
