"""Writes helm/moge/dashboards/moge-serve.json, the Grafana dashboard the chart ships as a ConfigMap
(`grafanaDashboard.enabled`). Written as code so that every panel's PromQL is in one readable list;
tests/unit/test_dashboard.py checks each query names only metrics a replica's /metrics exports.

    python helm/tools/dashboard.py          # regenerate after changing a panel
    python helm/tools/dashboard.py --check  # exit 1 if the chart's copy is stale (CI)

Latency and load panels read the vLLM names (`vllm:*`, `model_name` label), so they also show a
vLLM server scraped into the same Prometheus; the expert-group and placement panels read this
project's `moge_*` families.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "helm" / "moge" / "dashboards" / "moge-serve.json"
SEL = '{model_name=~"$model_name"}'
RATE = "$__rate_interval"


def quantiles(metric: str, qs=(0.5, 0.99)) -> list[tuple[str, str]]:
    return [(f"p{int(q * 100)}", f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{SEL}[{RATE}])))")
            for q in qs]


def mean(metric: str) -> tuple[str, str]:
    return "mean", f"sum(rate({metric}_sum{SEL}[{RATE}])) / sum(rate({metric}_count{SEL}[{RATE}]))"


GROUP_RATE = f"sum by (group) (rate(moge_expert_group_tokens_total[{RATE}]))"

# (row, [(title, unit, description, [(legend, expr), ...]), ...])
ROWS = [
    ("Latency (from arrival at the replica, as clients see it)", [
        ("Time to first token", "s", "Arrival to first token, streams and non-streams alike.",
         [*quantiles("vllm:time_to_first_token_seconds"), mean("vllm:time_to_first_token_seconds")]),
        ("Inter-token latency", "s", "Gap between consecutive tokens handed to clients.",
         [*quantiles("vllm:inter_token_latency_seconds"), mean("vllm:inter_token_latency_seconds")]),
        ("End-to-end latency", "s", "Arrival to the last token.", quantiles("vllm:e2e_request_latency_seconds")),
        ("Queue and prefill time", "s", "Arrival to first scheduled (queue); first scheduled to first token (prefill).",
         [("queue p99", quantiles("vllm:request_queue_time_seconds", (0.99,))[0][1]),
          ("prefill p99", quantiles("vllm:request_prefill_time_seconds", (0.99,))[0][1]),
          mean("vllm:request_queue_time_seconds")]),
    ]),
    ("Throughput and load", [
        ("Tokens per second", "short", "Generated and prompt tokens.",
         [("generated", f"sum(rate(vllm:generation_tokens_total{SEL}[{RATE}]))"),
          ("prompt", f"sum(rate(vllm:prompt_tokens_total{SEL}[{RATE}]))")]),
        ("Finished requests per second", "reqps", "By finish reason (abort: the client left).",
         [("{{finished_reason}}", f"sum by (finished_reason) (rate(vllm:request_success_total{SEL}[{RATE}]))")]),
        ("Running and waiting", "short", "Sequences in the batch and in the queue, summed over replicas.",
         [("running", f"sum(vllm:num_requests_running{SEL})"), ("waiting", f"sum(vllm:num_requests_waiting{SEL})")]),
        ("HTTP answers", "reqps", "Every answered request by route and status code.",
         [("{{route}} {{status}}", f"sum by (route, status) (rate(moge_requests_total[{RATE}]))")]),
    ]),
    ("KV cache and requests", [
        ("KV cache use", "percentunit", "Fraction of KV blocks in use (highest replica).",
         [("used", f"max(vllm:kv_cache_usage_perc{SEL})")]),
        ("Prefix cache hit rate", "percentunit", "Prompt tokens found in the prefix cache / tokens looked up.",
         [("hit rate", f"sum(rate(vllm:prefix_cache_hits_total{SEL}[{RATE}])) / "
                       f"sum(rate(vllm:prefix_cache_queries_total{SEL}[{RATE}]))")]),
        ("Preemptions per second", "short", "Sequences pushed back to the queue for want of KV blocks.",
         [("preemptions", f"sum(rate(vllm:num_preemptions_total{SEL}[{RATE}]))")]),
        ("Request lengths (p50)", "short", "Prompt and generated tokens per finished request.",
         [("prompt", quantiles("vllm:request_prompt_tokens", (0.5,))[0][1]),
          ("generated", quantiles("vllm:request_generation_tokens", (0.5,))[0][1])]),
    ]),
    ("Expert groups and placement", [
        ("Expert group load", "short", "Token rows routed to each expert group per second (all MoE layers).",
         [("group {{group}}", GROUP_RATE)]),
        ("Group imbalance", "percentunit", "(max - min) group load / tokens, over all MoE layers: 0 for MoGE "
         "by construction, > 0 for top-k checkpoints.",
         [("imbalance", f"(max({GROUP_RATE}) - min({GROUP_RATE})) / sum(rate(moge_expert_tokens_total[{RATE}]))")]),
        ("Placement epoch and devices", "short", "Epoch each replica has adopted; devices holding groups.",
         [("epoch (highest)", "max(moge_placement_epoch)"), ("epoch (lowest)", "min(moge_placement_epoch)"),
          ("devices", "max(moge_devices)"),
          ("groups without a live holder", "max(moge_expert_groups_without_live_holder)")]),
        ("Placement operations", "short", "Scale-ups, scale-downs, migrations and repairs the controller ran, "
         "by outcome (per 5 minutes).",
         [("{{kind}} {{outcome}}", "max by (kind, outcome) (increase(moge_placement_operations_total[5m]))"),
          ("expert call retries", "sum(increase(moge_expert_call_retries_total[5m]))")]),
    ]),
]


def panel(pid: int, title: str, unit: str, description: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 6, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (legend, expr) in enumerate(targets)],
    }


def build() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row):
            panels.append(panel(pid, *spec, x=6 * (i % 4), y=y + 8 * (i // 4)))
            pid += 1
        y += 8 * -(-len(row) // 4)
    return {
        "title": "moge-serve", "uid": "moge-serve", "tags": ["moge", "llm", "vllm"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": "model_name", "label": "model", "type": "query", "includeAll": True, "multi": True, "allValue": ".*",
             "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
             "query": {"query": "label_values(vllm:num_requests_running, model_name)", "refId": "models"},
             "definition": "label_values(vllm:num_requests_running, model_name)"},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed dashboard is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PATH.exists() or PATH.read_text() != text:
            print(f"{PATH} is stale: run python helm/tools/dashboard.py", file=sys.stderr)
            return 1
        return 0
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
