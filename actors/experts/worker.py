"""Expert worker: holds some expert groups (every MoE layer of each) on one device and computes
them for whichever attention replica calls. No request state (invariant 4): a call is
(layer, groups, x, ids, weights) in, per-group partial sums out.

The class is plain Python so it runs in-process (tests, single device); in a cluster it is a Ray
actor pinned to one accelerator by `worker_options` (Ray sets CUDA_VISIBLE_DEVICES /
ASCEND_RT_VISIBLE_DEVICES, so the worker's device is always index 0 of what it sees). Control
(load/drop/stats) goes through Ray actor calls; per-layer compute through the configured transport,
whose server this object starts in its own process.

Shape legend: T = tokens of the call, D = hidden, k = expert slots per token, n = groups in the call,
Eg = experts per group.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from actors.device import resolve_device, resolve_dtype, sync_stream, visible_devices_env
from actors.model import kernels
from actors.model.experts import ExpertGroupWeights, group_forward
from actors.model.config import ModelConfig
from actors.model.presets import get_preset
from actors.experts.transport.base import GroupNotHeld
from actors.experts.transport.codec import to_host_buffer

PRESET_PREFIX = "preset:"
STATS_WINDOW_S = 10.0  # tokens/s and busy fraction are reported over this sliding window


DEFAULT_MAX_CALL_TOKENS = 1 << 16


class CallRejected(ValueError):
    """A call outside what this worker accepts (shapes, bounds, duplicate groups): the caller's fault.
    Checked before any compute, so a malformed or hostile request costs no device time."""


def model_config_of(spec: dict) -> ModelConfig:
    """The ModelConfig a model_spec describes (only config.json is read for a directory)."""
    source = spec["source"]
    if source.startswith(PRESET_PREFIX):
        cfg = get_preset(source[len(PRESET_PREFIX):])
    else:
        from actors.weights.checkpoint import read_config

        cfg = read_config(Path(source))
    n_groups = spec.get("n_groups")
    return cfg.with_groups(n_groups) if n_groups else cfg


def worker_options(
    device_kind: str,
    num_gpus: float = 1,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    name: str | None = None,
    namespace: str | None = None,
    max_concurrency: int = 8,
) -> dict[str, Any]:
    """Ray `.options(...)` that pin one worker to one device of `device_kind`.

    cuda: num_gpus (1 = a whole GPU; <1 shares one, for small GPUs and tests).
    npu:  resources={"NPU": num_gpus}; Ray's NPU accelerator manager sets ASCEND_RT_VISIBLE_DEVICES.
    cpu:  a CPU slot of num_cpus (fractions let tests pack several workers on a 2-core machine).
    max_concurrency > 1 so ping/stats answer while a group loads; compute is thread-safe.
    """
    if device_kind not in ("cuda", "npu", "cpu"):
        raise ValueError(f"unknown device kind {device_kind!r}; expected cuda, npu or cpu")
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": max_concurrency, "max_restarts": 0}
    extra = dict(resources or {})
    if device_kind == "cuda":
        if num_gpus <= 0:
            raise ValueError("a cuda expert worker needs num_gpus > 0")
        opts["num_gpus"] = num_gpus
    elif device_kind == "npu":
        extra.setdefault("NPU", num_gpus if num_gpus > 0 else 1)
    if extra:
        opts["resources"] = extra
    if name is not None:
        opts.update(name=name, get_if_exists=True, lifetime="detached")
        if namespace is not None:
            opts["namespace"] = namespace
    return opts


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a single host
        pass
    return "127.0.0.1"


class _Meter:
    """Per-worker counters behind one lock (compute runs on several transport threads)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.calls = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.group_tokens: dict[int, int] = {}
        self.window: deque[tuple[float, int, float]] = deque()  # (end time, tokens, seconds)
        self.last_latency_s = 0.0

    def record(self, groups: list[int], tokens_per_group: list[int], seconds: float) -> None:
        now = self.clock()
        total = sum(tokens_per_group)
        with self.lock:
            self.calls += 1
            self.tokens += total
            self.busy_s += seconds
            self.last_latency_s = seconds
            for g, n in zip(groups, tokens_per_group):
                self.group_tokens[g] = self.group_tokens.get(g, 0) + n
            self.window.append((now, total, seconds))
            while self.window and self.window[0][0] < now - STATS_WINDOW_S:
                self.window.popleft()

    def snapshot(self) -> dict:
        now = self.clock()
        with self.lock:
            recent = [w for w in self.window if w[0] >= now - STATS_WINDOW_S]
            span = min(STATS_WINDOW_S, max(now - recent[0][0] + recent[0][2], 1e-9)) if recent else STATS_WINDOW_S
            return {
                "calls": self.calls,
                "tokens": self.tokens,
                "busy_s": self.busy_s,
                "tokens_per_s": sum(w[1] for w in recent) / span if recent else 0.0,
                "busy_fraction": min(1.0, sum(w[2] for w in recent) / span) if recent else 0.0,
                "step_latency_s": self.last_latency_s,
                "group_tokens": dict(self.group_tokens),
            }


class ExpertWorker:
    def __init__(
        self,
        worker_id: str,
        model_spec: dict,
        transport: str = "inprocess",
        transport_options: dict | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self.spec = dict(model_spec)
        self.cfg = model_config_of(self.spec)
        self.device = resolve_device(self.spec.get("device", "auto"))
        self.dtype = resolve_dtype(self.spec.get("dtype", "auto"), self.device)
        self.seed = int(self.spec.get("seed", 0))
        if "batch_invariant" in self.spec:  # the replicas' engine.batch_invariant (a process's one mode)
            kernels.set_batch_invariant(bool(self.spec["batch_invariant"]))
        self._groups: dict[int, ExpertGroupWeights] = {}  # replaced, never mutated: compute reads a snapshot
        self._load_lock = threading.Lock()
        self._meter = _Meter(clock)
        self.transport = transport
        options = dict(transport_options or {})
        if options.get("auth_token"):
            from actors.experts.transport.rendezvous_auth import set_process_secret

            set_process_secret(options["auth_token"])  # collective pairs, step lanes, group copies
        self.host = options.get("host") or _node_ip()
        self.max_call_tokens = int(options.get("max_call_tokens") or DEFAULT_MAX_CALL_TOKENS)
        self.max_reply_bytes = int(options.get("max_message_bytes") or (256 << 20))
        self._server = self._start_server(transport, options)
        self._lanes = None  # worker_lane.LaneServer, started by the first accept_lane
        self._lanes_lock = threading.Lock()
        self._copy_server = self._start_copy_server()

    # ---- transport server ----------------------------------------------------------------------

    def _start_server(self, transport: str, options: dict):
        if transport == "grpc":
            from actors.experts.transport.grpc import GrpcExpertServer

            return GrpcExpertServer(self, self.host, options)
        if transport == "collective":
            from actors.experts.transport.collective import CollectiveServer

            return CollectiveServer(self, self.host, options)
        if transport == "inprocess":
            return None
        raise ValueError(f"unknown transport {transport!r}; expected grpc, collective or inprocess")

    def _start_copy_server(self):
        """The device lane peers copy groups from (actors/experts/group_copy.py); None if the
        device has no point-to-point backend here (the object store and checkpoint remain)."""
        from actors.experts.group_copy import GroupCopyServer

        try:
            return GroupCopyServer(lambda: self._groups, self.device, self.host)
        except Exception as exc:  # noqa: BLE001
            import logging

            logging.getLogger(__name__).warning("no device copy lane on %s: %s", self.worker_id, exc)
            return None

    def endpoint(self) -> dict:
        """How a replica reaches this worker's compute: {"transport", "worker_id", ...address,
        "copy": the group copy lane's address}."""
        info = {"transport": self.transport, "worker_id": self.worker_id}
        if self._server is not None:
            info.update(self._server.address())
        if self._copy_server is not None:
            info["copy"] = self._copy_server.address()
        return info

    def accept_peer(self, pair_id: str) -> dict:
        """Collective transport: open this worker's side of a replica<->worker process group."""
        if self.transport != "collective":
            raise RuntimeError(f"worker {self.worker_id} uses transport {self.transport!r}, not collective")
        return self._server.accept(pair_id)

    def accept_lane(self, lane_id: str, backend: str | None = None) -> dict:
        """Step lane (actors/experts/worker_lane.py): open this worker's side of one replica slot's
        lane, whatever the per-call transport. -> {"host", "port", "backend", "rank"}."""
        with self._lanes_lock:
            if self._lanes is None:
                from actors.experts.worker_lane import LaneServer

                self._lanes = LaneServer(self, self.host)
        return self._lanes.accept(lane_id, backend)

    def close_lane(self, lane_id: str) -> None:
        """Abort a lane whose replica is gone (its thread would otherwise wait for a header)."""
        if self._lanes is not None:
            self._lanes.close(lane_id)

    def lane_stats(self) -> dict:
        """{"lanes", "steps", "graph_replays", "wall_s"} over this worker's step lanes."""
        if self._lanes is None:
            return {"lanes": 0, "steps": 0, "graph_replays": 0, "wall_s": 0.0, "capture_errors": []}
        return self._lanes.stats()

    # ---- groups ----------------------------------------------------------------------------------

    def load_groups(self, groups: list[int], peer: Any = None, chain: list[str] | None = None,
                    peer_copy: dict | None = None, timeout_s: float = 60.0) -> dict:
        """Load `groups` (already held ones are skipped). Without `chain`: from `peer` (an
        ExpertWorker actor handle) through the object store if given, else the checkpoint / preset.
        With `chain` (e.g. ["device", "object_store", "checkpoint"], see group_sources.py): each
        source in turn, the device lane from `peer_copy` (the holder's copy endpoint), every remote
        step bounded by `timeout_s`. -> {"groups", "bytes", "seconds", "source", "attempts"}."""
        from actors.experts.group_sources import fetch_groups

        groups = sorted({int(g) for g in groups})
        for g in groups:
            if not 0 <= g < self.cfg.n_groups:
                raise ValueError(f"group {g} out of range 0..{self.cfg.n_groups - 1}")
        if chain is None:
            chain = ["object_store"] if peer is not None else ["checkpoint"]
        with self._load_lock:
            wanted = [g for g in groups if g not in self._groups]
            start = time.perf_counter()
            attempts: list[dict] = []
            if not wanted:
                loaded, source = {}, "held"
            else:
                loaded, source, attempts = fetch_groups(
                    wanted, tuple(chain), self.cfg, self.dtype, self.device, self._from_source,
                    peer_copy=peer_copy, peer_handle=peer, timeout_s=timeout_s)
            sync_stream(self.device)  # never the whole device: idle step lanes (device.sync_stream)
            self._groups = {**self._groups, **loaded}
        return {
            "groups": sorted(loaded),
            "bytes": sum(w.nbytes for w in loaded.values()),
            "seconds": time.perf_counter() - start,
            "source": source,
            "attempts": attempts,
        }

    def memory(self, reset_peak: bool = False) -> dict:
        """Device memory of this process: {"allocated", "peak"} bytes (cuda), for the benchmark's
        peak-extra-memory figure; zeros elsewhere."""
        if self.device.type != "cuda":
            return {"allocated": 0, "peak": 0}
        out = {"allocated": torch.cuda.memory_allocated(self.device), "peak": torch.cuda.max_memory_allocated(self.device)}
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def _from_source(self, groups: list[int]) -> dict[int, ExpertGroupWeights]:
        return groups_from_source(self.spec, self.cfg, groups, self.dtype, self.device)

    def export_groups_raw(self, groups: list[int]) -> dict[int, dict]:
        """export_groups with every tensor as (dtype, shape, uint8 numpy buffer) for the object store."""
        return {
            g: {**data, "w13": {layer: to_host_buffer(t) for layer, t in data["w13"].items()},
                "w2": {layer: to_host_buffer(t) for layer, t in data["w2"].items()}}
            for g, data in self.export_groups(groups).items()
        }

    def export_groups(self, groups: list[int]) -> dict[int, dict]:
        """CPU copies of held groups for a peer: {g: {"group", "first_expert", "w13": {layer: t}, "w2": ...}}."""
        held = self._groups
        groups = [int(g) for g in groups]
        if len(set(groups)) != len(groups) or len(groups) > self.cfg.n_groups:
            raise CallRejected(f"group ids must be unique and at most {self.cfg.n_groups}: {groups[:16]}")
        missing = [g for g in groups if g not in held]
        if missing:
            raise GroupNotHeld(f"worker {self.worker_id} does not hold groups {missing}")
        return {g: export_weights(held[g]) for g in groups}

    def drop_groups(self, groups: list[int]) -> dict:
        with self._load_lock:
            dropped = [g for g in groups if g in self._groups]
            self._groups = {g: w for g, w in self._groups.items() if g not in dropped}
        # empty_cache frees with cudaFree, which waits for the whole device: not while step lanes
        # keep receives posted (the allocator reuses the cached blocks for the next load anyway)
        if self.device.type == "cuda" and not (self._lanes is not None and self._lanes.stats()["lanes"]):
            torch.cuda.empty_cache()
        return {"groups": sorted(dropped)}

    def held_groups(self) -> list[int]:
        return sorted(self._groups)

    def bytes_held(self) -> int:
        return sum(w.nbytes for w in self._groups.values())

    # ---- compute ---------------------------------------------------------------------------------

    @torch.no_grad()
    def compute(
        self,
        layer: int,
        group_ids: list[int],
        x: torch.Tensor,  # [T, D]
        ids: torch.Tensor,  # [T, k] int64 global expert ids; slots of other groups (or -1) ignored
        weights: torch.Tensor,  # [T, k] float32
    ) -> torch.Tensor:
        """-> [n, T, D] in x.dtype: partial[i] = Σ_k w · E(x) over group_ids[i]'s experts. Partials
        are not summed here so the replica adds them in group order, as LocalExperts does."""
        held = self._groups
        missing = [g for g in group_ids if g not in held]
        if missing:
            raise GroupNotHeld(f"worker {self.worker_id} does not hold groups {missing} (holds {sorted(held)})")
        self.check_call(held, layer, group_ids, x, ids, weights)
        start = time.perf_counter()
        x = x.to(self.device, self.dtype)
        ids = ids.to(self.device)
        weights = weights.to(self.device, torch.float32)
        out = torch.empty((len(group_ids), *x.shape), dtype=x.dtype, device=self.device)
        eg = self.cfg.experts_per_group
        tokens: list[int] = []
        for i, g in enumerate(group_ids):
            w = held[g]
            local = ids - w.first_expert
            out[i] = group_forward(w.w13[layer], w.w2[layer], x, local, weights)
            tokens.append(int(((local >= 0) & (local < eg)).any(1).sum()))  # host sync, like the copy-out
        sync_stream(self.device)
        self._meter.record(list(group_ids), tokens, time.perf_counter() - start)
        return out

    def check_call(self, held: dict, layer: int, group_ids: list[int], x: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor) -> None:
        """CallRejected unless the call is one a replica would send: unique held groups, a MoE layer
        they have, x [T, hidden] floating, ids / weights [T, k] with k <= top_k, T and the reply
        (n * T * hidden elements) within this worker's limits."""
        if len(set(group_ids)) != len(group_ids):
            raise CallRejected(f"duplicate group ids in {list(group_ids)[:16]}")
        if any(layer not in held[g].w13 for g in group_ids):
            raise CallRejected(f"layer {layer} is not a MoE layer of the held groups")
        hidden = self.cfg.hidden_size
        if x.dim() != 2 or x.shape[1] != hidden or not x.is_floating_point():
            raise CallRejected(f"x must be a floating [T, {hidden}] tensor, got {x.dtype}{list(x.shape)}")
        t = x.shape[0]
        if t > self.max_call_tokens:
            raise CallRejected(f"{t} tokens in one call; the limit is {self.max_call_tokens}")
        for name, tensor in (("ids", ids), ("weights", weights)):
            if tensor.dim() != 2 or tensor.shape[0] != t or tensor.shape[1] > self.cfg.top_k:
                raise CallRejected(f"{name} must be [{t}, k <= {self.cfg.top_k}], got {list(tensor.shape)}")
        if ids.dtype not in (torch.int64, torch.int32) or ids.shape != weights.shape or not weights.is_floating_point():
            raise CallRejected("ids must be integer and weights floating, of the same shape")
        reply = len(group_ids) * t * hidden * torch.empty((), dtype=self.dtype).element_size()
        if reply > self.max_reply_bytes:
            raise CallRejected(f"the reply would be {reply} bytes; the limit is {self.max_reply_bytes}")

    def warmup(self) -> dict:
        """Tiny calls per held group and MoE layer (a few tokens: the GEMV path), and one call above
        the GEMV limit per group (the grouped path): kernels compiled, GEMV tiles tuned (once per
        shape, kernels/moe.py), allocator primed, so none of it lands on the first steps served.
        An empty (standby) worker warms on zero weights of one group's shape, so a scale-up onto it
        only loads and does not compile."""
        try:  # kernels.moe imports triton (absent on CPU-only installs)
            from actors.model.kernels.moe import GEMV_MAX_TOKENS
        except ImportError:
            GEMV_MAX_TOKENS = 16

        start = time.perf_counter()
        d = self.cfg.hidden_size
        groups = dict(sorted(self._groups.items())) or self._dummy_group()
        for g, w in groups.items():
            for t in (2, GEMV_MAX_TOKENS + 1):
                x = torch.zeros(t, d, dtype=self.dtype, device=self.device)
                ids = torch.full((t, 1), w.first_expert, dtype=torch.long, device=self.device)
                wts = torch.ones(t, 1, dtype=torch.float32, device=self.device)
                for layer in (w.w13 if t == 2 else list(w.w13)[:1]):
                    group_forward(w.w13[layer], w.w2[layer], x, ids - w.first_expert, wts)
        sync_stream(self.device)
        return {"seconds": time.perf_counter() - start, "groups": sorted(self._groups)}

    def _dummy_group(self) -> dict[int, ExpertGroupWeights]:
        layer = next((i for i in range(self.cfg.num_layers) if self.cfg.is_moe_layer(i)), None)
        if layer is None:
            return {}
        eg, inner, d = self.cfg.experts_per_group, self.cfg.moe_intermediate_size, self.cfg.hidden_size
        z = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return {0: ExpertGroupWeights(0, 0, {layer: z(eg, 2 * inner, d)}, {layer: z(eg, d, inner)})}

    # ---- health and metrics ----------------------------------------------------------------------

    def ping(self) -> dict:
        return {"worker_id": self.worker_id, "held_groups": self.held_groups()}

    def device_info(self) -> dict:
        """What this process can see: its torch device, the visible-devices variable, Ray's grant."""
        kind = self.device.type
        env = visible_devices_env(kind)
        info = {
            "device": str(self.device),
            "kind": kind,
            "visible_devices_env": env,
            "visible_devices": os.environ.get(env) if env else None,
            "device_count": torch.cuda.device_count() if kind == "cuda" else None,
            "assigned_resources": None,
            "node_id": None,
            "pid": os.getpid(),
        }
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["assigned_resources"] = ctx.get_assigned_resources()
                info["node_id"] = ctx.get_node_id()  # which Ray node (machine / pod) the device is on
        except Exception:  # noqa: BLE001 - outside Ray there is nothing to report
            pass
        return info

    def stats(self) -> dict:
        """{"worker_id", "pid", "held_groups", "bytes_held", "calls", "tokens", "busy_s", "tokens_per_s",
        "busy_fraction", "step_latency_s", "group_tokens": {group: tokens}}."""
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),  # the controller notices a process replaced under the same id
            "held_groups": self.held_groups(),
            "bytes_held": self.bytes_held(),
            **self._meter.snapshot(),
        }

    def shutdown(self) -> None:
        if self._lanes is not None:
            self._lanes.stop()
        if self._copy_server is not None:
            self._copy_server.stop()
            self._copy_server = None
        if self._server is not None:
            self._server.stop()
            self._server = None


def groups_from_source(spec: dict, cfg: ModelConfig, groups: list[int], dtype: torch.dtype,
                       device: torch.device) -> dict[int, ExpertGroupWeights]:
    """`groups` from the checkpoint (memory-mapped safetensors) or regenerated from the preset."""
    source = spec["source"]
    if source.startswith(PRESET_PREFIX):
        from actors.weights.loader import random_expert_groups

        return random_expert_groups(cfg, groups, int(spec.get("seed", 0)), dtype, device)
    from actors.weights.checkpoint import load_expert_groups

    return load_expert_groups(Path(source), cfg, groups, dtype, device)


def export_weights(w: ExpertGroupWeights) -> dict:
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731 - the object store and gRPC both want host memory
    return {
        "group": w.group,
        "first_expert": w.first_expert,
        "w13": {layer: cpu(t) for layer, t in w.w13.items()},
        "w2": {layer: cpu(t) for layer, t in w.w2.items()},
    }
