"""The one place an attention replica is assembled from the configuration — by the product (the
Serve deployment), the benchmarks and the tests alike.

`plan_of(config)` (plan.py) resolves the modes once; `assemble` loads the attention part, builds
the experts for the plan (in process; a Dispatcher over workers started here; or over the elastic
controller's workers, with the epoch listener) and the LLMEngine around them. The pydantic
configuration stops here: the engine gets the plain dataclasses of actors/engine/build.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.engine.build import EngineSettings, LoadSpec
from actors.engine.sampling.grammar import GrammarLimits
from actors.engine.build import build_engine as build_from_settings
from actors.engine.engine import LLMEngine
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.weights.loader import LoadedModel
from cluster.config import MogeConfig
from cluster.replica.plan import ReplicaPlan, plan_of
from cluster.replica.workers import ReplicaWorkers


def load_spec(config: MogeConfig) -> LoadSpec:
    m = config.model
    return LoadSpec(m.source, m.dtype, m.device, m.n_groups, m.seed, m.name, m.max_model_len, m.quantization)


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
        grammar=GrammarLimits(max_bytes=e.grammar_max_bytes, compile_timeout_s=e.grammar_compile_timeout_s,
                              workers=e.grammar_workers),
        async_scheduling=e.async_scheduling,
        step_cost_ratio=e.step_cost_ratio,
    )


def build_engine(config: MogeConfig, experts=None, plan: ReplicaPlan | None = None) -> tuple[LLMEngine, LoadedModel]:
    """The engine with local experts, or with `experts` (a Dispatcher: ping-pong as planned); its
    grammar library warmed, so the first structured-output request compiles only its own grammar."""
    ping_pong = experts is not None and (plan or plan_of(config)).ping_pong
    engine, loaded = build_from_settings(load_spec(config), engine_settings(config, ping_pong), experts)
    engine.grammars.warm()
    return engine, loaded


@dataclass
class ReplicaParts:
    """What `assemble` built: the engine, the loaded model, the plan, the experts' dispatcher
    (remote modes) and the elastic side to attach once metrics exist and to close at shutdown."""

    engine: LLMEngine
    loaded: LoadedModel
    plan: ReplicaPlan
    experts: Dispatcher | None = None
    elastic: object | None = None  # cluster.replica.elastic_side.ElasticReplica (elastic mode)

    @property
    def mode(self) -> str:
        return self.plan.mode

    def close(self) -> None:
        if self.elastic is not None:
            self.elastic.close()  # leaves the ack set first, so no migration waits for us
        elif self.experts is not None:
            self.experts.close()


def assemble(config: MogeConfig, replica_id: str | None = None, workers: ReplicaWorkers | None = None) -> ReplicaParts:
    """This replica's engine for `plan_of(config)`. `workers`: the ReplicaWorkers a static replica
    starts its workers with (tests and benchmarks pass their own namespace)."""
    plan = plan_of(config)
    if plan.mode == "elastic":
        from cluster.elastic.stack import ensure_controller
        from cluster.replica.elastic_side import ElasticReplica

        ensure_controller(config)  # a Serve config deployment (KubeRay) has nobody else to start it
        elastic = ElasticReplica.connect(config, replica_id, plan=plan)
        engine, loaded = build_engine(config, elastic.experts, plan)
        return ReplicaParts(engine, loaded, plan, elastic.experts, elastic)
    if plan.mode == "static":
        from actors.experts.worker.spec import model_config_of
        from cluster.elastic.worker_fleet import model_spec
        from cluster.replica.dispatcher import static_dispatcher

        experts = static_dispatcher(config, model_config_of(model_spec(config)), workers, replica_id, plan)
        engine, loaded = build_engine(config, experts, plan)
        return ReplicaParts(engine, loaded, plan, experts)
    engine, loaded = build_engine(config)
    return ReplicaParts(engine, loaded, plan)
