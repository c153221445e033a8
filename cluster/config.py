"""Every knob of the system, in one pydantic model, loadable from YAML.

Precedence: defaults < YAML file (--config) < environment (MOGE_<SECTION>__<FIELD>) < CLI flags.
Pydantic stays at this edge: the data plane receives plain dataclasses / values built from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "MOGE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(_Section):
    source: str = Field(
        "preset:tiny-moge",
        description="'preset:<name>' or a Hugging Face-format checkpoint directory",
    )
    name: str | None = Field(None, description="served model id; default: preset name or directory name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|npu)(:\d+)?$",
                        description="auto, cpu, cuda or npu, optionally with an index (cuda:1)")
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's")
    seed: int = 0
    n_groups: int | None = Field(None, ge=1, description="top-k checkpoints: expert shards; MoGE: fixed")
    quantization: Literal["auto", "none", "fp8"] = Field(
        "auto", description="fp8: block-scaled FP8 attention projections, shared and routed experts (bf16 "
        "checkpoints and presets quantized at load); auto: FP8 checkpoints stay FP8 on FP8 GPUs, are "
        "dequantized elsewhere; none: everything in dtype. In-process experts only: expert workers "
        "hold dtype weights")


class EngineSection(_Section):
    max_num_seqs: int = Field(32, ge=1, description="sequences in one decode batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens per step (prefill chunking)")
    kv_block_size: int = Field(16, ge=1)
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache budget; default from memory")
    kv_cache_fraction: float | None = Field(
        None, gt=0, le=0.95, description="of free device memory, if no bytes; overrides gpu_memory_utilization")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of the whole device this replica may take (weights, activation peak, "
        "CUDA graphs, the KV cache in the rest), as vLLM's; a fractional replica_num_gpus scales it; CPU: 0.3 of free memory")
    num_kv_blocks: int | None = Field(None, ge=1, description="overrides the byte budget (tests)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of prompt prefixes seen before")
    batch_invariant: bool = Field(
        False, description="a request's logits bit-identical whatever else is in its batch, wherever its "
        "groups are placed and whether its prefix came from the cache (docs/architecture.md, invariant 7)")
    grammar_max_bytes: int = Field(
        512 << 10, ge=1024, description="largest JSON schema / grammar a request may constrain its output with (400 beyond)")
    grammar_compile_timeout_s: float = Field(
        10, gt=0, description="a grammar must compile within this, off the step thread (400 beyond)")
    grammar_workers: int = Field(1, ge=1, description="threads that compile grammars, and threads that compute masks ahead "
                                 "(llguidance drops the GIL); more make big grammars faster and take CPU from the steps")
    cuda_graphs: bool = Field(True, description="steps through CUDA graphs (CUDA; in-process experts: decode and mixed steps, the step lane: decode steps); false = eager")
    cuda_graph_memory_mb: int = Field(4096, ge=0, description="device memory the step graphs may take")
    async_scheduling: bool | None = Field(
        None, description="prepare step N+1 on the host while the device runs step N (null: on CUDA)")
    step_cost_ratio: float = Field(
        1.5, ge=0, description="with decodes running, a step with prompt chunks costs at most this times a full "
        "decode step (a start-up profile of the CUDA graphs sets the token cap); 0 = max_num_batched_tokens only")


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty = no auth")
    admin_keys: list[str] = Field(default_factory=list, description="keys for /admin; empty = admin API off")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    admin_max_body_bytes: int = Field(16 << 10, ge=256, description="body limit of /admin routes")
    body_read_timeout_s: float = Field(10, gt=0, description="a request body must arrive within this (408)")
    request_timeout_s: float = Field(600, gt=0, description="total deadline of one request (504)")
    max_waiting_requests: int = Field(
        64, ge=0, description="sequences (max(n, best_of) per request) a replica admits beyond engine.max_num_seqs; more get 429")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429")
    extra_ongoing_requests: int = Field(
        128, ge=8, description="Serve slots beyond the admitted generation requests, for /health, /metrics "
        "and clients still sending their body")
    max_n: int = Field(8, ge=1, description="cap on n (choices per request)")
    stream_interval_ms: float = Field(
        0, ge=0, le=1000, description="a stream's outputs are sent at most this often, together (0: as "
        "each step makes them); fewer messages through the ingress hop, burstier tokens (vLLM's "
        "stream_interval, Ray Serve LLM's 50 ms batching)")
    resume_window_s: float = Field(
        3, gt=0, description="how long the ingress tries to resume a request on another replica after its "
        "replica died; past it the request ends (503 / an in-band error)")
    max_partial_bodies: int = Field(
        512, ge=1, description="bodies still arriving at once, all clients together (more: 429); a body "
        "that arrives whole never waits")
    max_partial_bodies_per_client: int = Field(
        128, ge=1, description="bodies still arriving at once from one client address (more: 429)")
    piece_carrier: Literal["socket", "serve"] = Field(
        "socket", description="how a replica's pieces reach the ingress: socket = one authenticated TCP "
        "connection per (ingress, replica) pair on the node address, a step's pieces in one frame; "
        "serve = a Serve streaming call per request (a Ray message per piece; no port beyond Ray's)")
    ingress_num_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress deployment")
    ingress_num_cpus: float = Field(0, ge=0, description="logical CPUs of each ingress replica (it mostly waits on sockets)")
    max_tokens_default: int | None = Field(
        None, ge=1, description="cap on the completion of a request that omits max_tokens; None = until the "
        "context ends (as OpenAI and vLLM do)")
    tool_call_parser: Literal["auto", "hermes", "mistral", "pangu"] = Field(
        "auto", description="tool-call format; auto = from the checkpoint's chat template and family "
        "(cluster/serve/tools/formats.py)")
    responses_max_stored: int = Field(
        1024, ge=0, description="/v1/responses kept per replica for GET and previous_response_id "
        "(least recently used dropped first); 0 = store nothing")
    responses_max_stored_bytes: int = Field(64 << 20, ge=0, description="bound on the stored responses' size")
    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    replica_num_cpus: float = Field(1, ge=0)
    replica_num_gpus: float = Field(0, ge=0)


class DataPlaneSection(_Section):
    transport: Literal["inprocess", "grpc", "collective"] = "inprocess"
    num_workers: int = Field(1, ge=1, description="expert workers (devices) at start")
    worker_num_cpus: float = Field(1, ge=0)
    worker_num_gpus: float = Field(0, ge=0, description="1 per worker on GPUs; <1 to share")
    worker_resources: dict[str, float] = Field(default_factory=dict, description='e.g. {"NPU": 1}')
    ping_pong: bool | Literal["auto"] = Field(
        "auto", description="two micro-batches per step so one's attention overlaps the other's remote experts; "
        "auto = on only for the (device kind, carrier) pairs where it was measured to pay (cluster/replica/plan.py)")
    per_step: Literal["off", "lane", "stream"] = Field(
        "off", description="carry whole steps (one header per step, one message per layer and worker): lane = one "
        "communicator per (replica, worker), nccl between GPUs (gloo on CPU); stream = one bidirectional gRPC "
        "stream per (replica, worker) (transport grpc). The transport above then only carries failover calls")
    step_lane: bool = Field(False, description="older name of per_step: lane")
    warm_fallback: bool | None = Field(
        None, description="the replica's failover copy of the experts (read from the checkpoint) is loaded at start "
        "instead of when a worker first fails; default: on CPU replicas")
    call_timeout_s: float = Field(30, gt=0, description="deadline of one expert call")
    hang_deadline_factor: float = Field(
        5, gt=1, description="a call not answered within this many times the slowest of the last 64 replies "
        "(at least hang_deadline_min_s) counts its worker as hung: its groups fail over")
    hang_deadline_min_s: float = Field(1.0, gt=0, description="the floor of that deadline")
    grpc_max_message_bytes: int = Field(256 << 20, ge=1 << 20)
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_ca: str | None = None
    advertise_host: str | None = Field(None, description="address workers bind and advertise; default: Ray node IP")


class PolicySection(_Section):
    name: Literal["utilisation", "slo", "schedule", "none"] = "none"
    min_devices: int = Field(1, ge=1)
    max_devices: int = Field(8, ge=1)
    period_s: float = Field(5, gt=0)
    cooldown_s: float = Field(30, ge=0)
    window_s: float = Field(30, gt=0)
    # utilisation policy
    target_utilisation: float = Field(0.6, gt=0, le=1)
    target_queue_per_device: float = Field(4, ge=0)
    hysteresis: float = Field(0.2, ge=0, lt=1)
    # slo policy
    ttft_p99_ms: float = Field(2000, gt=0)
    itl_p99_ms: float = Field(200, gt=0)
    # schedule policy: list of {at: "HH:MM", devices: N}
    schedule: list[dict[str, Any]] = Field(default_factory=list)


class ElasticSection(_Section):
    redis_url: str | None = Field(None, description="redis[s]://:password@host:port/db; None = embedded")
    redis_password: str | None = None
    key_prefix: str = "moge"
    metrics_interval_s: float = Field(1, gt=0)
    migration_source: Literal["device", "object_store", "peer", "checkpoint"] = Field(
        "object_store", description="where a migration target loads a group, first choice of a fallback chain: "
        "device = the holder's tensors over nccl/hccl (gloo on CPU) straight into the target's buffers, "
        "then the object store, then the checkpoint; object_store (alias peer) = the holder's raw buffers "
        "through Ray's object store, then the checkpoint; checkpoint = the safetensors / preset only")
    migration_deadline_s: float = Field(
        60, gt=0, description="how long a holder may take to deliver groups over one source before the "
        "target falls back to the next")
    local_groups: bool = Field(
        False, description="attention replicas hold expert groups in process (holder 'local'): the "
        "cluster starts on one device with every group there, a scale-up moves groups to expert "
        "workers and a scale-down brings them back; the replica's device counts as one of the devices and "
        "data_plane.num_workers is not used at start")
    standby_workers: int = Field(
        0, ge=0, description="expert workers kept started but empty (each on its own device), so a "
        "scale-up skips process start and only loads groups; refilled after use")
    policy: PolicySection = Field(default_factory=PolicySection)


def unsupported(transport: str, per_step: str, local_groups: bool, ping_pong) -> str | None:
    """Why a data-plane combination is refused (docs/architecture.md, "Carriers and holders"), or None."""
    if per_step != "off" and local_groups:
        # a step link runs a worker's whole step; groups computed in the replica's own process have
        # no worker at the far end, so their every layer would take the per-call path inside the step
        return (f"data_plane.per_step: {per_step} cannot be combined with elastic.local_groups: a step link only "
                "reaches expert workers, not groups the replica holds in process; turn one of them off")
    if transport == "inprocess":
        if per_step != "off":
            return f"data_plane.per_step: {per_step} needs expert workers: set data_plane.transport to grpc or collective"
        if ping_pong is True:
            return "data_plane.ping_pong overlaps remote experts: with data_plane.transport inprocess there are none"
        if local_groups:
            return "elastic.local_groups needs expert workers to grow onto: set data_plane.transport to grpc or collective"
    if per_step == "stream" and transport != "grpc":
        return f"data_plane.per_step: stream is a gRPC stream: it needs data_plane.transport grpc, not {transport}"
    return None


class MogeConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    server: ServerSection = Field(default_factory=ServerSection)
    data_plane: DataPlaneSection = Field(default_factory=DataPlaneSection)
    elastic: ElasticSection = Field(default_factory=ElasticSection)

    @model_validator(mode="after")
    def _check(self) -> "MogeConfig":
        p = self.elastic.policy
        if p.min_devices > p.max_devices:
            raise ValueError(f"elastic.policy.min_devices ({p.min_devices}) > max_devices ({p.max_devices})")
        if self.server.min_replicas > self.server.max_replicas:
            raise ValueError("server.min_replicas > server.max_replicas")
        dp = self.data_plane
        if dp.step_lane:
            if dp.per_step not in ("off", "lane"):
                raise ValueError("data_plane.step_lane (the older name of per_step: lane) contradicts "
                                 f"data_plane.per_step: {dp.per_step}")
            dp.per_step = "lane"
        refused = unsupported(dp.transport, dp.per_step, self.elastic.local_groups, dp.ping_pong)
        if refused:
            raise ValueError(refused)
        if self.model.quantization == "fp8" and self.data_plane.transport != "inprocess":
            raise ValueError("model.quantization fp8 applies to in-process experts only: expert workers hold "
                             "their groups in model.dtype (FP8 groups do not migrate yet); use data_plane."
                             "transport inprocess, or quantization auto / none")
        if self.model.quantization == "fp8" and self.engine.batch_invariant:
            raise ValueError("engine.batch_invariant does not cover model.quantization fp8 yet (the invariant "
                             "kernels take bf16/fp32 weights); turn one of them off")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None, **overrides: Any) -> "MogeConfig":
        data: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the top level of the config must be a mapping")
            data = loaded
        _merge(data, _from_env(os.environ if env is None else env))
        _merge(data, overrides)
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
