"""The disaggregated data plane as an attention replica builds it: expert workers started (or found)
for the config, placement at start, and a RemoteExperts wired to the chosen transport.
cluster/serve/replica_engine.py builds the engine around it when data_plane.transport != "inprocess"
and no Redis is configured.

Several replicas may run this at once: workers are named, detached actors (cluster/elastic/worker_fleet.py),
so every replica finds the same w0..w{D-1}; placement at start is the pure pack_groups, so every
replica computes the same epoch-0 placement; load_groups skips groups already held. After start the
controller owns the placement; replicas adopt its epochs between steps (RemoteExperts.adopt).
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray

from actors.device import resolve_device
from actors.model.config import ModelConfig
from actors.experts.placement import Placement, pack_groups
from actors.experts.remote_experts import RemoteExperts
from actors.experts.transport.base import ExpertTransport, WorkerRef
from actors.experts.transport.factory import make_transport
from cluster.config import MogeConfig
from cluster.elastic.worker_fleet import WorkerFleet, model_spec

log = logging.getLogger(__name__)

WORKER_NAMESPACE = "moge"  # workers are found by name from Serve replicas, whose own namespace differs
REPLACE_ATTEMPTS = 5


def worker_ids(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def local_fallback(config: MogeConfig, device) -> "ExpertWorker":
    """An in-process expert worker on the replica's device that loads a group from the checkpoint
    the first time no remote holder answers for it (RemoteExperts computes it here meanwhile).
    Nothing is loaded until then."""
    from actors.experts.worker import ExpertWorker

    return ExpertWorker("replica-fallback", {**model_spec(config), "device": str(device)}, "inprocess")


def client_transport(config: MogeConfig, device, replica_id: str | None = None) -> ExpertTransport:
    """The replica's side of data_plane.transport."""
    from actors.experts.transport.rendezvous_auth import set_process_secret
    from cluster.security import cluster_secret

    dp = config.data_plane
    # the same secret guards this process's torch.distributed rendezvous (collective pairs, step
    # lanes, the local holder's group copies): installed before any of them opens
    set_process_secret(cluster_secret.ensure())
    if dp.transport == "grpc":
        mutual = dp.grpc_tls_ca is not None
        return make_transport(
            "grpc",
            auth_token=cluster_secret.ensure(),
            timeout_s=dp.call_timeout_s,
            max_message_bytes=dp.grpc_max_message_bytes,
            tls_ca=dp.grpc_tls_ca or dp.grpc_tls_cert,  # self-signed worker cert: trust the cert itself
            tls_cert=dp.grpc_tls_cert if mutual else None,
            tls_key=dp.grpc_tls_key if mutual else None,
        )
    if dp.transport == "collective":
        return make_transport("collective", device=device, timeout_s=dp.call_timeout_s, replica_id=replica_id,
                              auth_token=cluster_secret.ensure())
    raise ValueError(f"data_plane.transport={dp.transport!r} has no remote expert workers")


class DataPlane:
    """Starts, finds and replaces the expert workers of one deployment."""

    def __init__(self, config: MogeConfig, fleet: WorkerFleet | None = None, namespace: str = WORKER_NAMESPACE) -> None:
        self.config = config
        self.fleet = fleet or WorkerFleet(config, namespace)

    def start(self, placement: Placement, ready_timeout_s: float = 300.0) -> dict[str, WorkerRef]:
        """Every worker of `placement` running and holding its groups, warmed up."""
        workers = list(placement.workers)
        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:  # actor start-ups overlap
            handles = dict(zip(workers, pool.map(lambda w: self.fleet.start(w, ready_timeout_s), workers)))
        loads = [handles[w].load_groups.remote(list(placement.groups_of(w))) for w in workers]
        ray.get(loads, timeout=ready_timeout_s)
        ray.get([handles[w].warmup.remote() for w in workers], timeout=ready_timeout_s)
        endpoints = ray.get([handles[w].endpoint.remote() for w in workers], timeout=ready_timeout_s)
        return {w: WorkerRef(w, handle=handles[w], endpoint=e) for w, e in zip(workers, endpoints)}

    def replace(self, worker_id: str, groups: tuple[int, ...]) -> WorkerRef:
        """A live worker under `worker_id` holding `groups`: the same actor if it still answers,
        else a new one (the dead actor's name frees up shortly after it dies, hence the retries)."""
        error: Exception | None = None
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                handle = self.fleet.start(worker_id)
                ray.get(handle.load_groups.remote(list(groups)))
                ray.get(handle.warmup.remote())
                log.warning("expert worker %s replaced (groups %s)", worker_id, list(groups))
                return WorkerRef(worker_id, handle=handle, endpoint=ray.get(handle.endpoint.remote()))
            except Exception as exc:  # noqa: BLE001 - retried with backoff, reported if all fail
                error = exc
                time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"could not replace expert worker {worker_id}: {error}") from error

    def stop(self, workers: list[str]) -> None:
        for w in workers:
            self.fleet.stop(w)


def build_remote_experts(
    config: MogeConfig,
    loaded_model_cfg: ModelConfig,
    device=None,
    replica_id: str | None = None,
    data_plane: DataPlane | None = None,
) -> RemoteExperts:
    """Start/find data_plane.num_workers workers, pack the groups on them (epoch 0) and return the
    replica's ExpertCompute. `device`: where the replica's activations live (default: config's)."""
    dp = config.data_plane
    device = resolve_device(device if device is not None else config.model.device)
    plane = data_plane or DataPlane(config)
    placement = pack_groups(loaded_model_cfg.n_groups, worker_ids(dp.num_workers))
    refs = plane.start(placement)
    replica_id = replica_id or uuid.uuid4().hex[:12]
    transport = client_transport(config, device, replica_id)
    remote = RemoteExperts(
        loaded_model_cfg, transport, placement, refs, replacer=plane.replace, wait_timeout_s=2 * dp.call_timeout_s,
        local_fallback=local_fallback(config, device),
    )
    return with_step_lane(config, remote, device, replica_id)


def with_step_lane(config: MogeConfig, remote: RemoteExperts, device, replica_id: str):
    """`remote` itself, or wrapped in the step lane when data_plane.step_lane is set (the
    configured transport then only carries failover calls)."""
    if not config.data_plane.step_lane:
        return remote
    from actors.experts.transport.step_lane import StepLaneExperts

    return StepLaneExperts(remote, resolve_device(device), slots=2, timeout_s=config.data_plane.call_timeout_s,
                           replica_id=replica_id)
