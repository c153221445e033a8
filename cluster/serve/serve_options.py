"""Ray Serve options of the two deployments (cluster/serve/app.py), from the configuration: also
the base of the server class's options under Ray Serve LLM (cluster/serve/llm/ray_llm.py)."""

from __future__ import annotations

import math
from typing import Any

from cluster.config import MogeConfig, ServerSection


def deployment_options(config: MogeConfig) -> dict[str, Any]:
    """Serve options of the replica deployment from the server section (replicas, resources)."""
    server: ServerSection = config.server
    # Serve's default (5 in flight per replica) would starve a batch of max_num_seqs. The replica
    # admits max_num_seqs + max_waiting_requests generation requests itself (429 beyond:
    # OpenAIServer._admitted); Serve gets extra_ongoing_requests more slots on top for the ingress's
    # probes and calls. Bodies are read by the ingress, so a slow client never holds one of these.
    admitted = config.engine.max_num_seqs + server.max_waiting_requests
    max_ongoing = max(admitted + server.extra_ongoing_requests, math.ceil(2 * server.target_ongoing_requests))
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": server.replica_num_cpus, "num_gpus": server.replica_num_gpus},
        "max_ongoing_requests": max_ongoing,
        "health_check_period_s": 10,
    }
    if server.num_replicas == "auto":
        opts["autoscaling_config"] = {
            "min_replicas": server.min_replicas,
            "max_replicas": server.max_replicas,
            "initial_replicas": server.min_replicas,
            "target_ongoing_requests": server.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = server.num_replicas
    return opts


def ingress_options(config: MogeConfig) -> dict[str, Any]:
    """The ingress holds every connection, slow ones included, each for at most the body deadline;
    its slots are cheap (no engine), so they are many: the caps on partial bodies bound the work."""
    server = config.server
    return {
        "num_replicas": server.ingress_num_replicas,
        "ray_actor_options": {"num_cpus": server.ingress_num_cpus},
        "max_ongoing_requests": 4 * (server.max_partial_bodies + server.max_waiting_requests
                                     + config.engine.max_num_seqs) + server.extra_ongoing_requests,
    }
