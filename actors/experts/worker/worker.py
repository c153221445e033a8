"""Expert worker: holds some expert groups (every MoE layer of each) on one device and computes
them for whichever attention replica calls. No request state (invariant 4): a call is
(layer, groups, x, ids, weights) in, per-group partial sums out.

The class is plain Python so it runs in-process (tests, single device); in a cluster it is a Ray
actor pinned to one accelerator by `worker_options` (Ray sets CUDA_VISIBLE_DEVICES /
ASCEND_RT_VISIBLE_DEVICES, so the worker's device is always index 0 of what it sees). Control
(load/drop/stats) goes through Ray actor calls; per-layer compute through the configured carrier,
whose server this object starts in its own process, and the step lane's server when a replica
opens a lane. Both reach this object through its public surface only (compute, holding, record,
device, cfg); its held groups are one GroupCompute (actors/model/group_compute.py), replaced
whole by every load and drop, so a step in flight keeps the snapshot it started with.

Shape legend: T = tokens of the call, D = hidden, k = expert slots per token, n = groups in the call,
Eg = experts per group.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import torch

from actors.device import resolve_device, resolve_dtype, sync_stream, visible_devices_env
from actors.experts.carriers.base import GroupNotHeld
from actors.experts.carriers.codec import to_host_buffer
from actors.experts.worker.meter import Meter
from actors.experts.worker.spec import export_weights, groups_from_source, model_config_of, node_ip
from actors.model import kernels
from actors.model.experts import ExpertGroupWeights
from actors.model.group_compute import GroupCompute

log = logging.getLogger(__name__)

DEFAULT_MAX_CALL_TOKENS = 1 << 16


class CallRejected(ValueError):
    """A call outside what this worker accepts (shapes, bounds, duplicate groups): the caller's fault.
    Checked before any compute, so a malformed or hostile request costs no device time."""


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
        self._compute = GroupCompute(self.cfg, {})  # replaced, never mutated: a step reads a snapshot
        self._load_lock = threading.Lock()
        self._meter = Meter(clock)
        self.transport = transport
        options = dict(transport_options or {})
        if options.get("auth_token"):
            from actors.experts.carriers.rendezvous_auth import set_process_secret

            set_process_secret(options["auth_token"])  # collective pairs, step lanes, group copies
        self.host = options.get("host") or node_ip()
        self.max_call_tokens = int(options.get("max_call_tokens") or DEFAULT_MAX_CALL_TOKENS)
        self.max_reply_bytes = int(options.get("max_message_bytes") or (256 << 20))
        self._server = self._start_server(transport, options)
        self._lanes = None  # worker_lane.LaneServer, started by the first accept_lane
        self._lanes_lock = threading.Lock()
        self._copy_server = self._start_copy_server()

    # ---- transport server ----------------------------------------------------------------------

    def _start_server(self, transport: str, options: dict):
        if transport == "grpc":
            from actors.experts.carriers.grpc_server import GrpcExpertServer

            return GrpcExpertServer(self, self.host, options)
        if transport == "collective":
            from actors.experts.carriers.collective import CollectiveServer

            return CollectiveServer(self, self.host, options)
        if transport == "inprocess":
            return None
        raise ValueError(f"unknown transport {transport!r}; expected grpc, collective or inprocess")

    def _start_copy_server(self):
        """The device lane peers copy groups from (actors/experts/group_copy.py); None if the
        device has no point-to-point backend here (the object store and checkpoint remain)."""
        from actors.experts.group_copy import GroupCopyServer

        try:
            return GroupCopyServer(lambda: self._compute.groups, self.device, self.host)
        except Exception as exc:  # noqa: BLE001
            log.warning("no device copy lane on %s: %s", self.worker_id, exc)
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
        """Step lane (actors/experts/lane/worker_lane.py): open this worker's side of one replica's
        lane, whatever the per-call carrier. -> {"host", "port", "backend", "rank"}."""
        with self._lanes_lock:
            if self._lanes is None:
                from actors.experts.lane.worker_lane import LaneServer

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
            held = self._compute.groups
            wanted = [g for g in groups if g not in held]
            start = time.perf_counter()
            attempts: list[dict] = []
            if not wanted:
                loaded, source = {}, "held"
            else:
                loaded, source, attempts = fetch_groups(
                    wanted, tuple(chain), self.cfg, self.dtype, self.device, self._from_source,
                    peer_copy=peer_copy, peer_handle=peer, timeout_s=timeout_s)
            sync_stream(self.device)  # never the whole device: idle step lanes (device.sync_stream)
            if loaded:
                self._hold({**held, **loaded})
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
        held = self._compute.groups
        groups = [int(g) for g in groups]
        if len(set(groups)) != len(groups) or len(groups) > self.cfg.n_groups:
            raise CallRejected(f"group ids must be unique and at most {self.cfg.n_groups}: {groups[:16]}")
        missing = [g for g in groups if g not in held]
        if missing:
            raise GroupNotHeld(f"worker {self.worker_id} does not hold groups {missing}")
        return {g: export_weights(held[g]) for g in groups}

    def drop_groups(self, groups: list[int]) -> dict:
        with self._load_lock:
            held = self._compute.groups
            dropped = [g for g in groups if g in held]
            if dropped:
                self._hold({g: w for g, w in held.items() if g not in dropped})
        # empty_cache frees with cudaFree, which waits for the whole device: not while step lanes
        # keep receives posted (the allocator reuses the cached blocks for the next load anyway)
        if self.device.type == "cuda" and not (self._lanes is not None and self._lanes.stats()["lanes"]):
            torch.cuda.empty_cache()
        return {"groups": sorted(dropped)}

    def _hold(self, groups: dict[int, ExpertGroupWeights]) -> None:
        """The new held set as one GroupCompute (restacked: consecutive groups share one tensor per
        layer; the old snapshot keeps its own stacks for the steps still reading it)."""
        copies = {g: ExpertGroupWeights(w.group, w.first_expert, dict(w.w13), dict(w.w2)) for g, w in groups.items()}
        nbytes = sum(w.nbytes for w in copies.values())
        # a restack copies the held bytes once more for a moment: only with room for it
        room = self.device.type != "cuda" or torch.cuda.mem_get_info(self.device)[0] > 1.2 * nbytes
        compute = GroupCompute(self.cfg, copies, stack=room)
        sync_stream(self.device)  # the restack's copies ran on this thread's stream: publish once there
        self._compute = compute

    def holding(self) -> GroupCompute:
        """The held groups' compute, a snapshot (the step lane reads one per step)."""
        return self._compute

    def record(self, groups: list[int], tokens_per_group: list[int], seconds: float) -> None:
        """Meter a step served outside `compute` (the step lane's)."""
        self._meter.record(groups, tokens_per_group, seconds)

    def held_groups(self) -> list[int]:
        return list(self._compute.held)

    def bytes_held(self) -> int:
        return self._compute.nbytes

    # ---- compute ---------------------------------------------------------------------------------

    @torch.no_grad()
    def compute(
        self,
        layer: int,
        group_ids: list[int],
        x: torch.Tensor,  # [T, D]
        ids: torch.Tensor,  # [T, K] int64 global expert ids; slots of other groups (or -1) ignored
        weights: torch.Tensor,  # [T, K] float32
        whole: bool = False,
    ) -> torch.Tensor:
        """-> [n, T, D] in x.dtype: partial[i] = Σ_k w · E(x) over group_ids[i]'s experts. Partials
        are not summed here so the replica adds them in group order, as every combine does; with
        `whole` (group_ids is every group of the model) their sum [T, D], added in that order here."""
        compute = self._compute
        missing = [g for g in group_ids if g not in compute.groups]
        if missing:
            raise GroupNotHeld(f"worker {self.worker_id} does not hold groups {missing} (holds {list(compute.held)})")
        self.check_call(compute, layer, group_ids, x, ids, weights, whole)
        start = time.perf_counter()
        x = x.to(self.device, self.dtype)
        ids = ids.to(self.device)
        weights = weights.to(self.device, torch.float32)
        if whole:
            out = compute.combined(layer, x, ids, weights)
        else:
            out = compute.partials(layer, x, ids, weights, group_ids)
        hit = (ids // self.cfg.experts_per_group).unsqueeze(-1) == torch.tensor(group_ids, device=ids.device)
        tokens = hit.any(1).sum(0).tolist()  # [n]: the call's one host sync, like the copy-out
        sync_stream(self.device)
        self._meter.record(list(group_ids), tokens, time.perf_counter() - start)
        return out

    def check_call(self, compute: GroupCompute, layer: int, group_ids: list[int], x: torch.Tensor,
                   ids: torch.Tensor, weights: torch.Tensor, whole: bool = False) -> None:
        """CallRejected unless the call is one a replica would send: unique held groups (every group
        of the model when `whole`), a MoE layer they have, x [T, hidden] floating, ids / weights
        [T, k] with k <= top_k (MoGE: k = top_k), T and the reply within this worker's limits."""
        held = compute.groups
        if len(set(group_ids)) != len(group_ids):
            raise CallRejected(f"duplicate group ids in {list(group_ids)[:16]}")
        if whole and sorted(group_ids) != list(range(self.cfg.n_groups)):
            raise CallRejected("a whole-step reply sums every group of the model")
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
        layout = compute.slots.check(ids)
        if layout is not None:
            raise CallRejected(layout)
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
        compute = self._compute if self._compute.held else GroupCompute(self.cfg, self._dummy_group())
        for t in (2, GEMV_MAX_TOKENS + 1):
            x = torch.zeros(t, d, dtype=self.dtype, device=self.device)
            ids = torch.cat([torch.full((t, self.cfg.k_per_group if self.cfg.family == "moge" else 1),
                                        w.first_expert, dtype=torch.long, device=self.device)
                             for w in compute.groups.values()], 1)
            ids = torch.nn.functional.pad(ids, (0, self.cfg.top_k - ids.shape[1]), value=-1)
            wts = torch.ones(ids.shape, dtype=torch.float32, device=self.device)
            layers = list(next(iter(compute.groups.values())).w13)
            for layer in (layers if t == 2 else layers[:1]):
                compute.partials(layer, x, ids, wts)
        sync_stream(self.device)
        return {"seconds": time.perf_counter() - start, "groups": self.held_groups()}

    def _dummy_group(self) -> dict[int, ExpertGroupWeights]:
        layer = next((i for i in range(self.cfg.num_layers) if self.cfg.is_moe_layer(i)), None)
        if layer is None:
            return {}
        eg, inner, d = self.cfg.experts_per_group, self.cfg.moe_intermediate_size, self.cfg.hidden_size
        z = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return {0: ExpertGroupWeights(0, 0, {layer: z(eg, 2 * inner, d)}, {layer: z(eg, d, inner)})}

    # ---- health and metrics ----------------------------------------------------------------------

    def ping(self) -> dict:
        # the spec and carrier let a starter that got this live actor by name check it serves the
        # model it asked for (WorkerFleet.start)
        return {"worker_id": self.worker_id, "held_groups": self.held_groups(), "spec": dict(self.spec),
                "transport": self.transport}

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
