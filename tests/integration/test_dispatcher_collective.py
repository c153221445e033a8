"""The collective carriers under the elastic controller (real Ray, redis-server, CPU gloo): a replica
per call over gloo pairs and one over the step lane with collective failover stream greedy tokens
through scale 2 -> 3 and a migration, 0 failed requests, the single-process model's tokens.

    unshare -n bash -c 'ip link set lo up && exec timeout 900 python -m pytest -q tests/integration/test_dispatcher_collective.py'
"""

from __future__ import annotations

import pytest

from tests.integration.test_dispatcher_elastic import Replica, Streams, _steady, expected, start_stack  # noqa: F401
from tests.integration.test_elastic import ctl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(ray_local, tmp_path_factory):
    s = start_stack("collective", 3, tmp_path_factory)
    try:
        yield s
    finally:
        s.stop()


def test_per_call_and_step_lane_over_collective_under_scale_and_migrate(stack, expected):
    _steady(stack)
    replicas = [Replica(stack, per_step="off"), Replica(stack, per_step="lane")]
    loads = [Streams(r, 3) for r in replicas]
    try:
        for load in loads:
            load.__enter__()
        for load in loads:
            load.wait_for(3)
        steps = [ctl(stack, "scale", 3)]
        for load in loads:
            load.wait_for(3)
        p = ctl(stack, "placement")
        other = next(w for hs in p["holders"] for w in hs if w != p["holders"][0][0])
        steps.append(ctl(stack, "migrate", 0, other))
        for load in loads:
            load.wait_for(3)
    finally:
        for load in loads:
            load.__exit__()
        for r in replicas:
            r.close()
    assert [s["phase"] for s in steps] == ["done"] * len(steps), steps
    for load in loads:
        load.check(expected)
