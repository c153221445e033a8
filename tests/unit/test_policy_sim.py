"""The policy simulator: traces, the capacity model's direction, and the PNG."""

from __future__ import annotations

import pytest

from cluster.config import PolicySection
from cluster.elastic.policy.policies import make_policy
from cluster.elastic.policy.sim import CapacityModel, SimClock, load_trace, plot, rps_at, shape_trace, simulate, summary
from cluster.elastic.policy.guarded import guarded_from_config


def run(name, trace, **knobs):
    section = PolicySection(name=name, max_devices=8, period_s=5, cooldown_s=20, window_s=20, **knobs)
    clock = SimClock(trace[0][0])
    policy = guarded_from_config(section, make_policy(section), clock)
    return simulate(trace, policy, clock, CapacityModel(rps_per_device=2.0, scale_up_delay_s=10),
                    tick_s=section.period_s, window_s=section.window_s)


def test_trace_interpolation_and_csv(tmp_path):
    trace = [(0.0, 1.0), (10.0, 3.0)]
    assert rps_at(trace, -5) == 1.0 and rps_at(trace, 5) == 2.0 and rps_at(trace, 99) == 3.0
    f = tmp_path / "t.csv"
    f.write_text("t,rps\n10,4\n0,2\n")
    assert load_trace(f) == [(0.0, 2.0), (10.0, 4.0)]
    with pytest.raises(ValueError):
        shape_trace("square")


@pytest.mark.parametrize("name", ["utilisation", "slo"])
def test_policies_follow_a_step_up_and_back_down(name):
    steps = run(name, shape_trace("step", duration_s=1200, peak_rps=9.0))
    quiet = [s.devices for s in steps if s.t < 250]
    busy = [s.devices for s in steps if 600 <= s.t < 900]
    late = [s.devices for s in steps if s.t > 1150]
    assert max(quiet) <= 2
    assert min(busy) >= 5  # 9 rps needs at least 4.5 devices of 2 rps
    assert max(late) < min(busy)
    assert summary(steps)["peak_devices"] <= 8


def test_schedule_policy_ignores_traffic():
    steps = run("schedule", shape_trace("spike", 600, 20), schedule=[{"at": "00:00", "devices": 3}])
    assert {s.devices for s in steps} == {1, 3}  # starts at 1, moves to 3 once the new devices arrive
    assert steps[-1].devices == 3


def test_plot_writes_a_png(tmp_path):
    steps = run("utilisation", shape_trace("diurnal", 600, 6))
    out = plot(steps, tmp_path / "sim.png", "test", 2000, 200, 2.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
