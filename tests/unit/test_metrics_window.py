"""Percentiles, rates and load figures over a window of samples."""

from __future__ import annotations

import pytest

from cluster.elastic.metrics_window import MetricsWindow, ReplicaSample, WorkerSample, percentile


def test_percentile_interpolates_between_order_statistics():
    assert percentile([], 99) is None
    assert percentile([5.0], 99) == 5.0
    xs = [float(i) for i in range(1, 101)]  # 1..100, shuffled order must not matter
    assert percentile(list(reversed(xs)), 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0


def test_window_keeps_only_samples_inside_it():
    w = MetricsWindow.of(10, 20, [ReplicaSample("r", ts) for ts in (5, 10, 15, 20, 25)],
                         [WorkerSample("w", ts, 1.0) for ts in (9, 11)])
    assert [s.ts for s in w.replicas] == [15, 20]
    assert [s.ts for s in w.workers] == [11]
    assert MetricsWindow.of(0, 1).empty


def test_latencies_merge_raw_samples_across_replicas():
    # a per-replica p99 average would be ~50; the merged p99 sees the slow replica's tail
    fast = ReplicaSample("a", 1, ttft_ms=tuple([10.0] * 99), itl_ms=(5.0,))
    slow = ReplicaSample("b", 2, ttft_ms=(1000.0,) * 3, itl_ms=(50.0,))
    w = MetricsWindow.of(0, 10, [fast, slow])
    assert w.ttft_p(99) == pytest.approx(1000.0)
    assert w.ttft_p(50) == 10.0
    assert w.itl_p(50) == pytest.approx(27.5)


def test_queue_and_running_use_the_latest_sample_of_each_replica():
    samples = [ReplicaSample("a", 1, queue=9, running=1), ReplicaSample("a", 2, queue=3, running=4),
               ReplicaSample("b", 1.5, queue=2, running=2, kv_use=0.7)]
    w = MetricsWindow.of(0, 10, samples)
    assert w.queue() == 5 and w.running() == 6 and w.kv_use() == 0.7


def test_worker_rates_utilisation_and_group_imbalance():
    ws = [WorkerSample("w0", 1, 1.0, tokens=100, busy_s=0.5, group_tokens={0: 50, 1: 50}),
          WorkerSample("w0", 2, 1.0, tokens=100, busy_s=0.3, group_tokens={0: 50, 1: 50}),
          WorkerSample("w1", 2, 1.0, tokens=60, busy_s=2.0, group_tokens={2: 60})]
    w = MetricsWindow.of(0, 4, workers=ws)
    assert w.tokens_per_s() == pytest.approx(65.0)
    assert w.utilisation() == {"w0": pytest.approx(0.4), "w1": 1.0}  # busy beyond the interval caps at 1
    assert w.mean_utilisation() == pytest.approx(0.7)
    assert w.group_tokens() == {0: 100, 1: 100, 2: 60}
    assert w.group_imbalance() == pytest.approx((100 - 60) / (260 / 3))
    assert w.group_imbalance(n_groups=4) == pytest.approx(100 / 65)  # group 3 saw nothing


def test_balanced_moge_groups_have_zero_imbalance():
    w = MetricsWindow.of(0, 1, workers=[WorkerSample("w", 1, 1, group_tokens={g: 40 for g in range(8)})])
    assert w.group_imbalance(8) == 0.0
