"""Families read at scrape time, from state that other parts keep anyway: the engine's stats
(queue, batch, KV use, prefix cache, preemptions) and the expert data plane (placement epoch,
devices, per-group load, retries, and the controller's operation counters in elastic mode).
Nothing here runs on the step thread."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_VLLM_LABELS = ["model_name", "engine"]


def _field(stats: Any, name: str) -> float:
    value = stats.get(name, 0) if isinstance(stats, dict) else getattr(stats, name, 0)
    return float(value or 0)


class EngineCollector:
    def __init__(self, engine_stats: Callable[[], Any], model: str) -> None:
        self.engine_stats = engine_stats
        self.labels = [model, "0"]

    def describe(self) -> list[Metric]:
        return []  # names vary with nothing; skip the registry's trial collect

    def collect(self) -> Iterator[Metric]:
        s = self.engine_stats()
        waiting, running, kv = _field(s, "waiting"), _field(s, "running"), _field(s, "kv_usage")
        queried, hits = _field(s, "prefix_cache_queried_tokens"), _field(s, "prefix_cache_hit_tokens")
        yield GaugeMetricFamily("moge_num_requests_waiting", "sequences queued, not yet scheduled", waiting)
        yield GaugeMetricFamily("moge_num_requests_running", "sequences in the running batch", running)
        yield GaugeMetricFamily("moge_kv_cache_usage_ratio", "fraction of KV cache blocks in use", kv)
        yield GaugeMetricFamily("moge_prefix_cache_hit_ratio", "share of admitted prompt tokens found in the "
                                "prefix cache, since start", hits / queried if queried else 0.0)
        for family, name, doc, value in (
            (GaugeMetricFamily, "vllm:num_requests_running", "sequences in the running batch", running),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "sequences queued, not yet scheduled", waiting),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc", "fraction of KV cache blocks in use (1 = all)", kv),
            (CounterMetricFamily, "vllm:prefix_cache_queries", "prompt tokens looked up in the prefix cache", queried),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "prompt tokens found in the prefix cache", hits),
            (CounterMetricFamily, "vllm:num_preemptions", "sequences preempted for KV blocks, since start",
             _field(s, "preemptions")),
        ):
            metric = family(name, doc, labels=_VLLM_LABELS)
            metric.add_metric(self.labels, value)
            yield metric


class ExpertCollector:
    """Empty until `watch` names the replica's Dispatcher (static and elastic modes)."""

    def __init__(self) -> None:
        self.experts: Any = None
        self.cluster_state: Callable[[], dict] | None = None

    def watch(self, experts: Any, cluster_state: Callable[[], dict] | None = None) -> None:
        self.experts, self.cluster_state = experts, cluster_state

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        experts = self.experts
        if experts is None:
            return
        m = experts.metrics()
        yield GaugeMetricFamily("moge_placement_epoch", "placement epoch this replica has adopted", m["epoch"])
        yield GaugeMetricFamily("moge_devices", "devices holding expert groups in that placement (the "
                                "replicas' own device counts when it holds groups)", len(experts.placement.workers))
        yield GaugeMetricFamily("moge_expert_groups_without_live_holder", "expert groups every holder of which "
                                "has failed (served by failover until repaired)",
                                len(experts.groups_without_live_holder()))
        yield CounterMetricFamily("moge_expert_call_retries", "expert calls re-sent after a failure", m["retries"])
        per_group = CounterMetricFamily("moge_expert_group_tokens", "token rows this replica routed to each expert "
                                        "group, summed over MoE layers", labels=["group"])
        totals: dict[int, int] = {}
        for counts in m["group_tokens"].values():
            for g, n in enumerate(counts):
                totals[g] = totals.get(g, 0) + n
        for g in sorted(totals):
            per_group.add_metric([str(g)], totals[g])
        yield per_group
        yield CounterMetricFamily("moge_expert_tokens", "tokens through the MoE layers, summed over layers (|X| of "
                                  "the imbalance score)", sum(m["tokens"].values()))
        state = self.cluster_state() if self.cluster_state is not None else None
        if state is not None:
            ops = CounterMetricFamily("moge_placement_operations", "placement changes the controller ran, by kind "
                                      "(scale_up, scale_down, migrate, repair) and outcome (done, rolled_back)",
                                      labels=["kind", "outcome"])
            for (kind, outcome), n in sorted(state.get("operations", {}).items()):
                ops.add_metric([kind, outcome], n)
            yield ops
