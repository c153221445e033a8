"""Each policy as a pure function of a scaling context."""

from __future__ import annotations

import calendar

import pytest

from cluster.config import PolicySection
from cluster.elastic.metrics_window import MetricsWindow, ReplicaSample, WorkerSample
from cluster.elastic.policy.policies import (NoPolicy, SchedulePolicy, ScalingContext, SloPolicy, UtilisationPolicy,
                              make_policy, parse_schedule)


def ctx(devices, *, util=None, queue=0, ttft=None, itl=None, now=100.0, n_workers=None):
    workers = []
    if util is not None:
        workers = [WorkerSample(f"w{i}", now, 1.0, busy_s=util) for i in range(n_workers or devices)]
    replicas = [ReplicaSample("r0", now, queue=queue, ttft_ms=tuple(ttft or ()), itl_ms=tuple(itl or ()))]
    if util is None and ttft is None and itl is None and not queue:
        replicas = []
    return ScalingContext(now, MetricsWindow.of(now - 30, now, replicas, workers), devices, 8)


class TestUtilisation:
    p = UtilisationPolicy(target_utilisation=0.5, target_queue_per_device=4)

    def test_at_target_holds(self):
        d = self.p(ctx(2, util=0.5))
        assert d.devices == 2 and d.load == pytest.approx(1.0)

    def test_busy_workers_scale_up_proportionally(self):
        assert self.p(ctx(2, util=0.9)).devices == 4  # ceil(2 * 0.9 / 0.5)

    def test_idle_workers_scale_down(self):
        d = self.p(ctx(4, util=0.1))
        assert d.devices == 1 and d.load == pytest.approx(0.2)

    def test_queue_alone_can_demand_devices(self):
        d = self.p(ctx(1, util=0.1, queue=12))
        assert d.devices == 3 and d.load == pytest.approx(3.0)

    def test_no_worker_metrics_holds(self):
        d = self.p(ctx(3))
        assert d.devices == 3 and d.load is None


class TestSlo:
    p = SloPolicy(ttft_p99_ms=1000, itl_p99_ms=100)

    def test_large_ttft_miss_at_most_doubles_devices(self):
        d = self.p(ctx(2, ttft=[100] * 50 + [3000] * 5, itl=[10]))
        assert d.devices == 4 and d.load == pytest.approx(3.0) and "missed" in d.reason

    def test_small_itl_miss_adds_one_device(self):
        assert self.p(ctx(2, ttft=[10], itl=[110] * 10)).devices == 3
        assert self.p(ctx(4, ttft=[10], itl=[150] * 10)).devices == 6  # ceil(4 * 1.5)

    def test_busy_workers_block_scale_down_despite_latency_margin(self):
        # 3 workers at 70 % would run at 105 % on 2: latency would explode, so hold
        assert self.p(ctx(3, ttft=[100], itl=[10], util=0.7)).devices == 3
        assert self.p(ctx(3, ttft=[100], itl=[10], util=0.2)).devices == 2

    def test_large_margin_removes_a_device(self):
        d = self.p(ctx(4, ttft=[100], itl=[10]))
        assert d.devices == 3 and d.load == pytest.approx(0.1 * 4 / 3)

    def test_small_margin_holds(self):
        # one device fewer would project 80 ms * 2 = 160 ms > 100 ms
        assert self.p(ctx(2, ttft=[100], itl=[80])).devices == 2

    def test_single_device_never_goes_below_one(self):
        assert self.p(ctx(1, ttft=[1], itl=[1])).devices == 1

    def test_no_latency_samples_holds(self):
        d = self.p(ctx(2, util=0.9))
        assert d.devices == 2 and d.load is None

    def test_idle_replicas_give_a_device_back_unless_work_is_waiting(self):
        idle = ScalingContext(100.0, MetricsWindow.of(70, 100, [ReplicaSample("r0", 99.0)]), 3, 8)
        d = self.p(idle)
        assert d.devices == 2 and d.load == 0.0 and "idle" in d.reason
        assert self.p(ctx(3, queue=2)).devices == 3  # queued work has no TTFT yet: not idle
        running = ScalingContext(100.0, MetricsWindow.of(70, 100, [ReplicaSample("r0", 99.0, running=1)]), 3, 8)
        assert self.p(running).devices == 3
        assert self.p(ScalingContext(100.0, idle.window, 1, 8)).devices == 1


def ts(hh, mm):
    return float(calendar.timegm((2025, 3, 1, hh, mm, 0)))


class TestSchedule:
    p = SchedulePolicy(parse_schedule([{"at": "18:00", "devices": 2}, {"at": "08:30", "devices": 6}]))

    def test_latest_entry_before_now_applies(self):
        assert self.p(ctx(1, now=ts(8, 30))).devices == 6
        assert self.p(ctx(1, now=ts(17, 59))).devices == 6
        assert self.p(ctx(1, now=ts(23, 0))).devices == 2

    def test_before_first_entry_yesterdays_last_holds(self):
        assert self.p(ctx(4, now=ts(3, 0))).devices == 2

    @pytest.mark.parametrize("bad", [{"at": "25:00", "devices": 1}, {"at": "8h", "devices": 1},
                                     {"at": "08:00", "devices": 0}, {"devices": 2}])
    def test_bad_entries_are_rejected_with_the_entry(self, bad):
        with pytest.raises(ValueError, match="schedule entry"):
            parse_schedule([bad])


def test_make_policy_from_config():
    assert isinstance(make_policy(PolicySection(name="utilisation", target_utilisation=0.7)), UtilisationPolicy)
    slo = make_policy(PolicySection(name="slo", ttft_p99_ms=500))
    assert isinstance(slo, SloPolicy) and slo.ttft_p99_ms == 500
    sched = make_policy(PolicySection(name="schedule", schedule=[{"at": "00:00", "devices": 3}]))
    assert sched(ctx(1, now=ts(12, 0))).devices == 3
    assert make_policy(PolicySection()).__class__ is NoPolicy
