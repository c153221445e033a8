"""The serving application: a thin HTTP ingress (cluster/serve/ingress/) in front of the attention
replicas, the server half, as two Ray Serve deployments.

`app_builder({"config": <MogeConfig dict>})` is the Serve application builder, usable from Python
(`serve.run(app_builder(...))`) and from a Serve config file (`import_path:
cluster.serve.app:app_builder`). Each attention replica builds its engine once, in `start_engine`,
the single place that decides how the model is put together (cluster/replica/assemble.py), and
answers through async-generator methods: `generate` for the ingress (pieces: bytes plus the engine
outputs behind them, cluster/serve/ingress/pieces.py) and, as a Ray Serve LLM server class
(`LLMConfig(server_cls=AttentionReplica)`), Ray's `chat` / `completions` / `tokenize` /
`detokenize` protocol (cluster/serve/llm/). One server half, two ingresses.

Secrets never travel in deployment or constructor arguments: the builder seals them into Ray's KV
(cluster/security/serving_secrets.py) and each actor unseals them; MOGE_* variables of the actor's
own environment (Kubernetes Secrets) apply on top.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve
from ray.serve import Application

from cluster.config import MogeConfig
from cluster.security.serving_secrets import seal, unseal
from cluster.serve.ingress.pieces import Piece, RequestContext
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.openai_server import OpenAIServer, ServedModel
from cluster.replica.assemble import ReplicaParts, assemble
from cluster.serve.serve_options import deployment_options, ingress_options

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "AttentionReplica"
INGRESS_NAME = "Ingress"


@dataclass
class ReplicaEngine:
    """The running engine, what it serves, and the parts assembled for it."""

    engine: Any  # actors.engine.async_engine.AsyncEngine
    served: ServedModel
    parts: ReplicaParts

    @property
    def mode(self) -> str:
        return self.parts.mode

    @property
    def elastic(self):
        return self.parts.elastic

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.parts.close()


def start_engine(config: MogeConfig) -> ReplicaEngine:
    """Assemble this replica's engine (cluster/replica/assemble.py) and start its step thread."""
    from actors.engine.async_engine import AsyncEngine

    parts = assemble(config)
    served = ServedModel(name=parts.loaded.name, tokenizer=parts.loaded.tokenizer,
                         max_model_len=parts.engine.spec.max_model_len, family=parts.loaded.cfg.family)
    return ReplicaEngine(AsyncEngine(parts.engine), served, parts)


class AttentionReplica:
    """The server half. A plain class: `app_builder` and Ray Serve LLM's builder each make it a
    deployment. `config`: a (sealed) MogeConfig dict; or `llm_config`: Ray Serve LLM's LLMConfig,
    whose engine_kwargs are a MogeConfig dict and whose model_loading_config names the checkpoint."""

    def __init__(self, config: dict[str, Any] | None = None, *, llm_config: Any = None) -> None:
        self._llm_config = llm_config
        if llm_config is not None:
            from cluster.serve.llm.ray_llm import config_of

            config = config_of(llm_config)
        self.config = MogeConfig.load(**unseal(config or {}))
        self.replica = start_engine(self.config)
        self.engine, self.served = self.replica.engine, self.replica.served
        self.metrics = ReplicaMetrics(self.served.name, self.engine.stats, self.served.max_model_len, part="engine")
        if self.replica.elastic is not None:
            self.replica.elastic.attach(self.engine, self.metrics)
        elif self.replica.parts.experts is not None:
            self.metrics.watch_experts(self.replica.parts.experts)
        self._channel = None  # piece channel connections, by ingress (opened on first use)
        admitted = self.config.engine.max_num_seqs + self.config.server.max_waiting_requests
        self.server = OpenAIServer(self.engine, self.served, self.config.server, self.metrics, max_in_flight=admitted)
        log.info("attention replica serving %s (context %d, experts %s)", self.served.name,
                 self.served.max_model_len, self.replica.parts.plan.describe())

    # ---- for the ingress (cluster/serve/ingress/backend.py ServeBackend) ------------------------

    async def send_pieces(self, route: str, body: Any, ctx: RequestContext, ingress: tuple[str, int],
                          stream_id: str) -> int:
        """One request whose pieces go over this replica's piece channel to `ingress` (its address;
        server.piece_carrier "socket", cluster/serve/channel/); returns, with their count, once the
        last is on the wire. Cancelled by the ingress (client gone): the engine requests abort."""
        from cluster.serve.channel.outbox import send_all

        outbox = await self._outboxes().to(ingress)
        return await send_all(outbox, stream_id, self.server.run(route, body, ctx))

    async def generate(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        """The same over a Serve streaming call (server.piece_carrier "serve")."""
        async for piece in self.server.run(route, body, ctx):
            yield piece

    def _outboxes(self):
        if self._channel is None:
            from cluster.security import cluster_secret
            from cluster.serve.channel.outbox import Outboxes

            self._channel = Outboxes(cluster_secret.ensure().encode(), _replica_name())
        return self._channel

    async def model_info(self) -> dict:
        return self.server.model_info()

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    async def check_ready(self) -> bool:
        """The ingress's probe: answers as soon as this replica serves."""
        return self.engine.is_alive()

    async def ready(self) -> dict:
        """Degraded while an expert group has no live holder (its calls wait for a failover)."""
        experts = self.replica.parts.experts
        if experts is None:
            return {"ready": self.engine.is_alive()}
        unserved = experts.groups_without_live_holder()
        return {"ready": not unserved, "groups_without_live_holder": unserved, "epoch": experts.epoch}

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead step thread makes Serve replace this replica."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine step thread is not running")

    # ---- Ray Serve LLM's server protocol (ray.llm._internal.serve.core.protocol) -----------------

    async def start(self) -> None:
        """The engine started in __init__ (Serve waits for the constructor)."""

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        from cluster.serve.llm.ray_llm import answer_for_ray

        async for item in answer_for_ray(self.server, "/v1/chat/completions", request):
            yield item

    async def completions(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        from cluster.serve.llm.ray_llm import answer_for_ray

        async for item in answer_for_ray(self.server, "/v1/completions", request):
            yield item

    async def tokenize(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        from cluster.serve.llm.ray_llm import answer_for_ray

        async for item in answer_for_ray(self.server, "/tokenize", request):
            yield item

    async def detokenize(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        from cluster.serve.llm.ray_llm import answer_for_ray

        async for item in answer_for_ray(self.server, "/detokenize", request):
            yield item

    async def llm_config(self) -> Any:
        return self._llm_config

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        from cluster.serve.llm.ray_llm import deployment_options_for

        return deployment_options_for(llm_config)

    def __del__(self) -> None:
        if getattr(self, "_channel", None) is not None:
            self._channel.close()
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


class Ingress:
    """The HTTP half (cluster/serve/ingress/http_app.py) over a handle to the attention replicas."""

    def __init__(self, replicas: Any, config: dict[str, Any]) -> None:
        from cluster.serve.ingress.backend import ServeBackend
        from cluster.serve.ingress.deployment import ingress_app

        self.config = MogeConfig.load(**unseal(config))
        inbox = None
        if self.config.server.piece_carrier == "socket":
            from cluster.security import cluster_secret
            from cluster.serve.channel.inbox import Inbox

            inbox = Inbox(cluster_secret.ensure().encode(), _node_address())
        self.http = ingress_app(self.config, ServeBackend(replicas, self.config.server.resume_window_s, inbox))

    def __serve_build_asgi_app__(self):  # Serve calls this once, after __init__
        return self.http


def _node_address() -> str:
    """Where replicas dial this ingress: the node's address as Ray knows it (never every interface)."""
    import ray

    return ray.util.get_node_ip_address()


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests)
        return "replica"


def app_builder(args: dict[str, Any]) -> Application:
    raw = dict(args.get("config") or {})
    config = MogeConfig.load(**raw)  # validates early and sizes the deployments with env applied
    public = seal(raw)  # the secrets wait in Ray's KV, not in the deployment arguments
    replicas = serve.deployment(AttentionReplica, name=DEPLOYMENT_NAME, **deployment_options(config)).bind(public)
    ingress = serve.ingress()(Ingress)  # its ASGI app comes from __serve_build_asgi_app__
    return serve.deployment(ingress, name=INGRESS_NAME, **ingress_options(config)).bind(replicas, public)
