"""A replica's data-plane modes, resolved once from the configuration (cluster/config.py has
already refused the combinations that are not supported, `unsupported`):

  mode        inprocess (every group in this process), static (expert workers started by the
              replica on a fixed placement, no Redis), elastic (the controller's workers,
              placement epochs from Redis)
  carrier     the per-call carrier: inprocess, grpc, collective (data_plane.transport)
  per_step    off, lane (a 2-rank communicator per worker) or stream (a gRPC stream per worker)
  holders     workers, or workers + the replica itself (elastic.local_groups)
  ping_pong   resolved: `auto` is on only where it was measured to pay (PING_PONG_PAYS)
  warm_fallback  the failover copy loaded at start (default: on CPU replicas)

The ping-pong rule. Two micro-batches hide one half's remote experts behind the other half's
attention, at the price of a second set of launches, messages (and, on the lane, packets) per
layer; it pays only where the experts' time away exceeds that price and the replica's device can
run the other half meanwhile. Measured (docs/performance.md): on CPU it halves throughput with
every carrier (attention and the experts share the cores and Python's lock: 96-104 vs 184 requests
in 75 s); on 2x H200 over the step lane it was slower too (11.1 vs 7.87 ms a step at batch 256).
No (device kind, carrier) pair has measured a gain yet, so `auto` is off everywhere; a measurement
that shows one adds the pair below, and `ping_pong: true` turns it on regardless.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import MogeConfig

# (device kind, carrier or per-step carrier) pairs where ping-pong was measured to pay
PING_PONG_PAYS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class ReplicaPlan:
    mode: str
    carrier: str
    per_step: str
    local_groups: bool
    ping_pong: bool
    warm_fallback: bool
    device_kind: str

    @property
    def remote(self) -> bool:
        return self.mode != "inprocess"

    def describe(self) -> str:
        if not self.remote:
            return "in process"
        path = self.carrier if self.per_step == "off" else f"{self.per_step} (failover over {self.carrier})"
        holders = "workers + this replica" if self.local_groups else "workers"
        return f"{self.mode}, {path}, holders {holders}, ping-pong {'on' if self.ping_pong else 'off'}"


def device_kind_of(config: MogeConfig) -> str:
    device = config.model.device.split(":")[0]
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is always there on a replica
        return "cpu"


def plan_of(config: MogeConfig) -> ReplicaPlan:
    dp, el = config.data_plane, config.elastic
    if dp.transport == "inprocess":
        mode = "inprocess"
    else:
        mode = "elastic" if el.redis_url else "static"
    if mode == "static" and el.local_groups:
        raise ValueError("elastic.local_groups needs the elastic control plane (the controller moves groups "
                         "between the replicas and the workers): set elastic.redis_url, or run `moge serve --elastic`")
    kind = device_kind_of(config)
    carrier = dp.per_step if dp.per_step != "off" else dp.transport
    if dp.ping_pong == "auto":
        ping_pong = mode != "inprocess" and (kind, carrier) in PING_PONG_PAYS
    else:
        ping_pong = bool(dp.ping_pong) and mode != "inprocess"
    warm = dp.warm_fallback if dp.warm_fallback is not None else kind == "cpu"
    return ReplicaPlan(mode, dp.transport, dp.per_step, el.local_groups, ping_pong, warm, kind)
