"""Bounds, cold start, cooldown and hysteresis, driven by a fake clock (no sleeping)."""

from __future__ import annotations

from cluster.config import PolicySection
from cluster.elastic.metrics_window import MetricsWindow, WorkerSample
from cluster.elastic.policy.policies import Decision, ScalingContext, make_policy
from cluster.elastic.policy.guarded import GuardedPolicy, guarded_from_config

import pytest


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def wants(devices, load):
    return lambda ctx: Decision(devices, "test", load)


def context(devices, clock, with_metrics=True):
    samples = [WorkerSample("w0", clock.t, 1.0)] if with_metrics else []
    return ScalingContext(clock.t, MetricsWindow.of(clock.t - 30, clock.t, workers=samples), devices, 8)


def guard(policy, clock, **kw):
    kw = {"min_devices": 1, "max_devices": 4, "cooldown_s": 60, "hysteresis": 0.2, **kw}
    return GuardedPolicy(policy, clock=clock, **kw)


def test_wish_is_clamped_to_bounds():
    clock = FakeClock()
    assert guard(wants(9, 3.0), clock).decide(context(2, clock)).devices == 4
    assert guard(wants(0, 0.0), clock, min_devices=2).decide(context(3, clock)).devices == 2


def test_out_of_bounds_cluster_is_corrected_even_in_cooldown():
    clock = FakeClock()
    g = guard(wants(2, 1.0), clock, min_devices=2)
    g.record_change()
    d = g.decide(context(1, clock))
    assert d.devices == 2 and "min_devices" in d.reason
    assert guard(wants(6, 2.0), clock).decide(context(6, clock)).devices == 4


def test_cold_start_holds_without_metrics():
    clock = FakeClock()
    d = guard(wants(4, 2.0), clock).decide(context(1, clock, with_metrics=False))
    assert d.devices == 1 and "cold start" in d.reason
    # a policy that reads no metrics (schedule) is followed from the first tick
    d = guard(wants(3, None), clock, needs_metrics=False).decide(context(1, clock, with_metrics=False))
    assert d.devices == 3


def test_cooldown_blocks_changes_until_it_expires():
    clock = FakeClock()
    g = guard(wants(3, 1.5), clock)
    assert g.decide(context(2, clock)).devices == 3
    g.record_change()
    clock.t += 59
    d = g.decide(context(3, clock))
    assert d.devices == 3  # policy now wants 3 == current: hold, no cooldown text needed
    g.policy = wants(4, 1.4)
    d = g.decide(context(3, clock))
    assert d.devices == 3 and "cooldown" in d.reason
    clock.t += 1
    assert g.decide(context(3, clock)).devices == 4


def test_hysteresis_only_delays_scale_down():
    clock = FakeClock()
    assert guard(wants(2, 0.85), clock).decide(context(3, clock)).devices == 3  # inside the band
    assert guard(wants(2, 0.79), clock).decide(context(3, clock)).devices == 2  # below 1 - 0.2
    assert guard(wants(4, 1.01), clock).decide(context(3, clock)).devices == 4  # up at once
    assert guard(wants(2, None), clock).decide(context(3, clock)).devices == 2  # no load signal


def test_no_flapping_under_a_steady_load_near_target():
    # utilisation policy, steady load: the device count settles and then never changes again
    clock = FakeClock()
    section = PolicySection(name="utilisation", target_utilisation=0.5, cooldown_s=10, hysteresis=0.2,
                            max_devices=8)
    g = guarded_from_config(section, make_policy(section), clock)
    devices, history = 1, []
    demand = 1.3  # device-seconds of expert work per second
    for _ in range(60):
        util = min(1.0, demand / devices)
        ctx = ScalingContext(clock.t, MetricsWindow.of(clock.t - 30, clock.t,
                             workers=[WorkerSample(f"w{i}", clock.t, 1.0, busy_s=util) for i in range(devices)]),
                             devices, 8)
        d = g.decide(ctx)
        if d.devices != devices:
            g.record_change()
            devices = d.devices
        history.append(devices)
        clock.t += 5
    assert history[-1] == 3  # ceil(1.3 / 0.5)
    changes = sum(1 for a, b in zip(history, history[1:]) if a != b)
    assert changes <= 2


def test_invalid_bounds_are_rejected():
    with pytest.raises(ValueError):
        GuardedPolicy(wants(1, 1.0), min_devices=3, max_devices=2)


def test_cooldown_reads_the_time_in_the_context():
    # one clock decides: the controller stamps ctx.now; the wrapper's own clock does not enter
    stuck = FakeClock(0.0)
    g = guard(wants(4, 1.4), stuck)
    g.record_change(at=1000.0)
    at = FakeClock(1030.0)
    assert "cooldown" in g.decide(context(3, at)).reason
    at.t = 1060.0
    assert g.decide(context(3, at)).devices == 4
