"""The one place an attention replica's engine is assembled from the configuration.

`engine_mode` decides how the replica reaches its routed experts; `assemble` loads the attention
part, builds the experts for that mode (in process, expert workers started here, or the elastic
controller's workers) and the LLMEngine around them. The pydantic configuration stops here: the
engine gets the plain dataclasses of actors/engine/build.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.engine.build import EngineSettings, LoadSpec
from actors.engine.build import build_engine as build_from_settings
from actors.engine.engine import LLMEngine
from actors.weights.loader import LoadedModel
from cluster.config import MogeConfig


def load_spec(config: MogeConfig) -> LoadSpec:
    m = config.model
    return LoadSpec(m.source, m.dtype, m.device, m.n_groups, m.seed, m.name, m.max_model_len)


def engine_settings(config: MogeConfig, ping_pong: bool = False) -> EngineSettings:
    e = config.engine
    share = config.server.replica_num_gpus
    # a replica on a fraction of a device (Ray fractional GPUs) takes that fraction of it
    utilisation = e.gpu_memory_utilization * (share if 0 < share < 1 else 1.0)
    return EngineSettings(
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        kv_block_size=e.kv_block_size,
        kv_cache_bytes=e.kv_cache_bytes,
        kv_cache_fraction=e.kv_cache_fraction,
        gpu_memory_utilization=utilisation,
        num_kv_blocks=e.num_kv_blocks,
        ping_pong=ping_pong,
        enable_prefix_caching=e.enable_prefix_caching,
        cuda_graphs=e.cuda_graphs,
        cuda_graph_memory_mb=e.cuda_graph_memory_mb,
        batch_invariant=e.batch_invariant,
        async_scheduling=e.async_scheduling,
        step_cost_ratio=e.step_cost_ratio,
    )


def build_engine(config: MogeConfig, experts=None) -> tuple[LLMEngine, LoadedModel]:
    """The engine with local experts, or with `experts` (remote: ping-pong as configured)."""
    ping_pong = experts is not None and config.data_plane.ping_pong
    return build_from_settings(load_spec(config), engine_settings(config, ping_pong), experts)


def engine_mode(config: MogeConfig) -> str:
    """How this replica reaches its experts:
    inprocess      every expert group in this process (data_plane.transport 'inprocess');
    elastic        expert workers owned by the controller, placement epochs from Redis
                   (a remote transport and elastic.redis_url set; cluster/elastic/replica.py);
    disaggregated  expert workers started by the replica itself on a fixed placement (a remote
                   transport without Redis: a static cluster with no control plane)."""
    if config.data_plane.transport == "inprocess":
        return "inprocess"
    return "elastic" if config.elastic.redis_url else "disaggregated"


@dataclass
class ReplicaParts:
    """What `assemble` built: the engine, the loaded model, and the data-plane part to attach once
    metrics exist (`elastic`) and to close at shutdown."""

    engine: LLMEngine
    loaded: LoadedModel
    mode: str
    elastic: Any = None  # cluster.elastic.replica.ElasticReplica (elastic mode)
    remote: Any = None  # actors.experts.remote_experts.RemoteExperts (disaggregated mode)

    def close(self) -> None:
        if self.elastic is not None:
            self.elastic.close()  # leaves the ack set first, so no migration waits for us
        elif self.remote is not None:
            self.remote.close()


def assemble(config: MogeConfig, replica_id: str | None = None, data_plane=None) -> ReplicaParts:
    """Build this replica's engine for `engine_mode(config)`. `data_plane`: a DataPlane to start
    the workers with (disaggregated mode; tests and benchmarks pass their own namespace)."""
    mode = engine_mode(config)
    if mode == "elastic":
        from cluster.elastic.replica import ElasticReplica
        from cluster.elastic.stack import ensure_controller

        ensure_controller(config)  # a Serve config deployment (KubeRay) has nobody else to start it
        elastic = ElasticReplica.connect(config, replica_id)
        engine, loaded = build_engine(config, experts=elastic.experts)
        return ReplicaParts(engine, loaded, mode, elastic=elastic)
    if mode == "disaggregated":
        from actors.experts.worker import model_config_of
        from cluster.elastic.worker_fleet import model_spec
        from cluster.serve.data_plane import build_remote_experts

        remote = build_remote_experts(
            config, model_config_of(model_spec(config)), replica_id=replica_id, data_plane=data_plane
        )
        engine, loaded = build_engine(config, experts=remote)
        return ReplicaParts(engine, loaded, mode, remote=remote)
    engine, loaded = build_engine(config)
    return ReplicaParts(engine, loaded, mode)
