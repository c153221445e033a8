"""The one place a replica's Dispatcher is made (the product, the benchmarks and the tests all
build through here): its carriers from the plan, the cluster secret installed for every
rendezvous, the replacement and the failover copy wired in.
"""

from __future__ import annotations

import uuid

import torch

from actors.device import resolve_device
from actors.experts.carriers.base import Carrier, StepCarrier, WorkerRef
from actors.experts.carriers.factory import make_carrier
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.placement import Placement, pack_groups
from actors.model.config import ModelConfig
from cluster.config import MogeConfig
from cluster.replica.plan import ReplicaPlan, plan_of
from cluster.replica.workers import ReplicaWorkers, local_fallback, worker_ids


def carriers(config: MogeConfig, plan: ReplicaPlan, device: torch.device, replica_id: str) -> tuple[Carrier, StepCarrier | None]:
    """The replica's side of data_plane.transport, and of data_plane.per_step."""
    from actors.experts.carriers.rendezvous_auth import set_process_secret
    from cluster.security import cluster_secret

    dp = config.data_plane
    secret = cluster_secret.ensure()
    # the same secret guards this process's torch.distributed rendezvous (collective pairs, step
    # lanes, the local holder's group copies): installed before any of them opens
    set_process_secret(secret)
    if plan.carrier == "grpc":
        mutual = dp.grpc_tls_ca is not None
        carrier = make_carrier(
            "grpc",
            auth_token=secret,
            timeout_s=dp.call_timeout_s,
            max_message_bytes=dp.grpc_max_message_bytes,
            tls_ca=dp.grpc_tls_ca or dp.grpc_tls_cert,  # self-signed worker cert: trust the cert itself
            tls_cert=dp.grpc_tls_cert if mutual else None,
            tls_key=dp.grpc_tls_key if mutual else None,
        )
    elif plan.carrier == "collective":
        carrier = make_carrier("collective", device=device, timeout_s=dp.call_timeout_s, replica_id=replica_id,
                               auth_token=secret)
    else:
        raise ValueError(f"data_plane.transport={plan.carrier!r} has no remote expert workers")
    step: StepCarrier | None = None
    if plan.per_step == "lane":
        from actors.experts.lane.step_lane import LaneCarrier

        step = LaneCarrier(device, timeout_s=dp.call_timeout_s, replica_id=replica_id)
    elif plan.per_step == "stream":
        from actors.experts.carriers.grpc_stream import GrpcStreamCarrier

        step = GrpcStreamCarrier(carrier, device)
    return carrier, step


def build_dispatcher(config: MogeConfig, cfg: ModelConfig, placement: Placement, refs: dict[str, WorkerRef],
                     replacer=None, replica_id: str | None = None, local=None, plan: ReplicaPlan | None = None,
                     device=None) -> Dispatcher:
    plan = plan or plan_of(config)
    device = resolve_device(device if device is not None else config.model.device)
    replica_id = replica_id or uuid.uuid4().hex[:12]
    carrier, step = carriers(config, plan, device, replica_id)
    dp = config.data_plane
    return Dispatcher(cfg, carrier, placement, refs, replacer=replacer, step_carrier=step, local=local,
                      local_fallback=local_fallback(config, device), warm_fallback=plan.warm_fallback,
                      wait_timeout_s=2 * dp.call_timeout_s, min_deadline_s=dp.hang_deadline_min_s,
                      deadline_factor=dp.hang_deadline_factor)


def static_dispatcher(config: MogeConfig, cfg: ModelConfig, workers: ReplicaWorkers | None = None,
                      replica_id: str | None = None, plan: ReplicaPlan | None = None) -> Dispatcher:
    """Start/find data_plane.num_workers workers, pack the groups on them (epoch 0)."""
    workers = workers or ReplicaWorkers(config)
    placement = pack_groups(cfg.n_groups, worker_ids(config.data_plane.num_workers))
    refs = workers.start(placement)
    return build_dispatcher(config, cfg, placement, refs, workers.replace, replica_id, plan=plan)
