"""The elastic controller: one detached Ray actor ("moge-controller", restarted by Ray on failure)
that owns the placement and the device inventory, keeps them in Redis, and runs the policy.

Every `period_s` it: puts its state back if Redis came back empty; finishes or rolls back a
journaled operation; turns worker stats into metric samples; replaces dead workers; asks the
guarded policy for a device count and scales to it. Operations (scale, migrate, repair) run one
at a time through cluster/elastic/migration.py; this file only wires Ray and Redis into that protocol.
A restarted controller rebuilds everything from Redis (and, if Redis lost it too, from the live
workers and the epochs the replicas report), so killing it loses nothing (invariant 5).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

import ray

from actors.experts.worker import model_config_of
from actors.experts.placement import Placement
from cluster.config import MogeConfig
from cluster.elastic.migration import MigrationRunner, Operation, Phase, validate_map
from cluster.elastic.placement_plan import move_group, plan_map
from cluster.elastic.policy.policies import Decision, ScalingContext, make_policy
from cluster.elastic.policy.guarded import guarded_from_config
from cluster.elastic.redis_server import connect
from cluster.elastic.store import ElasticStore, WorkerRecord, groups_of
from cluster.elastic.metrics_window import WorkerSample
from cluster.elastic.worker_fleet import WorkerFleet, model_spec

log = logging.getLogger(__name__)

CONTROLLER_NAME = "moge-controller"


class ControllerBusy(RuntimeError):
    """Another operation is in flight (HTTP 409)."""


class BadRequest(ValueError):
    """The request cannot be satisfied as asked (HTTP 400)."""


class RayPorts:
    """MigrationPorts over real expert workers (Ray) and the Redis store."""

    def __init__(self, fleet: WorkerFleet, store: ElasticStore, replica_ttl_s: float = 10.0,
                 load_timeout_s: float = 600.0, poll_s: float = 0.02, from_peers: bool = True) -> None:
        self.fleet = fleet
        self.from_peers = from_peers
        self.store = store
        self.replica_ttl_s = replica_ttl_s
        self.load_timeout_s = load_timeout_s
        self.poll_s = poll_s
        self.load_delay_s = 0.0  # test hook: widen the loading window so a test can kill the target
        self.before_stop: Any = None  # called with a worker id before it is stopped (last metrics)
        self.loaded_bytes = 0

    def load(self, worker: str, groups: list[int], peers: dict[int, str | None]) -> None:
        target = self.fleet.handle(worker)
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        by_peer: dict[str | None, list[int]] = {}
        for g in groups:
            by_peer.setdefault(peers.get(g) if self.from_peers else None, []).append(g)
        for peer, gs in by_peer.items():
            peer_handle = None
            if peer is not None:
                try:
                    peer_handle = self.fleet.handle(peer)
                except ValueError:
                    peer_handle = None  # the peer is gone: the checkpoint has the weights too
            try:
                out = ray.get(target.load_groups.remote(gs, peer_handle), timeout=self.load_timeout_s)
            except ray.exceptions.RayActorError:
                raise  # the target itself died: the operation fails and rolls back
            except Exception as e:  # noqa: BLE001 - the peer failed mid-copy: load from the checkpoint
                if peer_handle is None:
                    raise
                log.warning("peer copy of %s from %s failed (%s); loading from the checkpoint", gs, peer, e)
                out = ray.get(target.load_groups.remote(gs, None), timeout=self.load_timeout_s)
            self.loaded_bytes += int(out.get("bytes", 0))
        ray.get(target.warmup.remote(), timeout=self.load_timeout_s)

    def drop(self, worker: str, groups: list[int]) -> None:
        ray.get(self.fleet.handle(worker).drop_groups.remote(groups), timeout=60)

    def publish(self, groups, expected_epoch: int) -> int:
        return self.store.publish_placement(groups, expected_epoch)

    def current(self):
        p = self.store.placement()
        if p is None:
            return -1, {}
        return p.epoch, groups_of(p)

    def wait_acks(self, epoch: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                live = self.store.live_replicas(self.replica_ttl_s)
                if all(e >= epoch for e in live.values()):
                    return True
            except Exception as e:  # noqa: BLE001 - Redis blip: keep waiting until the deadline
                log.info("waiting for acks of epoch %d: %s", epoch, e)
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    def stop_worker(self, worker: str) -> None:
        if self.before_stop is not None:
            self.before_stop(worker)
        self.fleet.stop(worker)
        self.store.remove_worker(worker)

    def journal(self, op: Operation) -> None:
        op.detail.setdefault("t", {}).setdefault(op.phase.value, time.time())
        self.store.update_operation(op.to_dict())


class ElasticController:
    """Plain class; `start_controller` wraps it as the detached, restartable Ray actor."""

    def __init__(self, config: dict, namespace: str | None = None, run_loop: bool = True) -> None:
        self.cfg = MogeConfig.model_validate(config)
        el = self.cfg.elastic
        if not el.redis_url:
            raise ValueError("the controller needs elastic.redis_url (the embedded Redis sets it at start)")
        self.store = ElasticStore(connect(el.redis_url, el.redis_password), el.key_prefix)
        self.fleet = WorkerFleet(self.cfg, namespace)
        self.ports = RayPorts(self.fleet, self.store, from_peers=el.migration_source == "peer")
        self.ports.before_stop = self._sample_last
        self.runner = MigrationRunner(self.ports, ack_timeout_s=60.0)
        self.n_groups = model_config_of(model_spec(self.cfg)).n_groups
        self.section = el.policy
        self.policy = guarded_from_config(self.section, make_policy(self.section))
        self._op_lock = threading.Lock()
        self._known: Placement | None = None  # last placement seen, to restore an empty Redis
        self._known_workers: dict[str, WorkerRecord] = {}
        self._last_stats: dict[str, dict] = {}
        self._last_decision: Decision | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self.started_at = time.time()
        try:
            self._recover()
        except Exception as e:  # noqa: BLE001 - Redis may be down: the loop retries
            self._last_error = f"recovery pending: {e}"
            log.warning("controller recovery deferred: %s", e)
        self._thread = None
        if run_loop:
            self._thread = threading.Thread(target=self._loop, name="controller-loop", daemon=True)
            self._thread.start()

    # ---- startup and recovery -----------------------------------------------------------------

    def bootstrap(self, num_workers: int | None = None) -> dict:
        """First start: workers w0..w{n-1} and epoch 0. Later calls return the stored placement."""
        n = num_workers or self.cfg.data_plane.num_workers
        with self._op_lock:
            p = self.store.placement()
            if p is None:
                ids = [f"w{i}" for i in range(n)]
                for wid in ids:
                    self._start_worker(wid)
                groups = plan_map(self.n_groups, ids, {})
                for wid in ids:
                    self.ports.load(wid, sorted(g for g, hs in groups.items() if wid in hs), {})
                    self._set_state(wid, "serving")
                self.store.publish_placement(groups, None)
                p = self.store.placement()
            self._remember(p)
            return p.to_dict()

    def _recover(self) -> None:
        with self._op_lock:
            journal = self.store.operation()
            if journal is not None:
                op = Operation.from_dict(journal)
                if op.phase not in (Phase.DONE, Phase.ROLLED_BACK):
                    log.warning("resuming operation %s from phase %s", op.op_id, op.phase.value)
                    op = self.runner.resume(op)
                self._settle_inventory(op)
                self.store.end_operation(op.op_id)
            p = self.store.placement()
            if p is None and self.fleet.running():
                p = self._rebuild_from_workers()
            if p is not None:
                self._remember(p)
                self._sweep_orphans(p)
            state = self.store.controller()
            if "last_scale_at" in state:
                self.policy.last_change_at = float(state["last_scale_at"])
        self._last_error = None

    def _rebuild_from_workers(self) -> Placement:
        """Redis lost everything and so did we: ask the workers what they hold, and publish that
        above every epoch a replica reports so replicas adopt it."""
        held: dict[int, list[str]] = {}
        for wid in self.fleet.running():
            try:
                for g in ray.get(self.fleet.handle(wid).held_groups.remote(), timeout=10):
                    held.setdefault(int(g), []).append(wid)
                self._set_state(wid, "serving")
            except Exception as e:  # noqa: BLE001
                log.warning("worker %s did not answer during rebuild: %s", wid, e)
        workers = sorted({w for ws in held.values() for w in ws}) or ["w0"]
        groups = {g: tuple(held.get(g, ())) for g in range(self.n_groups)}
        if any(not hs for hs in groups.values()):
            fixed = plan_map(self.n_groups, workers, groups)
            for wid in workers:
                if wid not in self.fleet.running():
                    self._start_worker(wid)
                need = [g for g, hs in fixed.items() if wid in hs and wid not in groups[g]]
                if need:
                    self.ports.load(wid, need, {})
            groups = fixed
        floor = max(self.store.live_replicas(3600).values(), default=-1) + 1
        self.store.restore_placement(Placement(floor, tuple(groups[g] for g in range(self.n_groups))))
        log.warning("placement rebuilt from live workers at epoch %d", floor)
        return self.store.placement()

    def _sweep_orphans(self, p: Placement) -> None:
        """Workers nobody routes to (a scale-up that died before its journal) are stopped."""
        used = set(p.workers)
        for wid, rec in self.store.workers().items():
            if wid not in used and rec.state not in ("serving", "standby"):
                log.warning("removing orphan worker %s (%s)", wid, rec.state)
                self.ports.stop_worker(wid)
        inventory = set(self.store.workers())
        for wid in self.fleet.running():
            if wid not in used and wid not in inventory:
                self.fleet.stop(wid)
        for wid in used:
            if wid not in self.store.workers():
                self._set_state(wid, "serving")

    def _settle_inventory(self, op: Operation) -> None:
        if op.phase == Phase.DONE:
            for w in op.added_workers:
                self._set_state(w, "serving")
        for w in op.retired_workers if op.phase == Phase.DONE else op.added_workers:
            self.store.remove_worker(w)
            self._known_workers.pop(w, None)

    def _remember(self, p: Placement) -> None:
        self._known = p
        self._known_workers = self.store.workers()

    # ---- worker bookkeeping -------------------------------------------------------------------

    def _set_state(self, wid: str, state: str) -> None:
        rec = self.store.workers().get(wid) or WorkerRecord(wid, f"moge-expert-{wid}", created_at=time.time())
        rec.state = state
        self.store.put_worker(rec)
        self._known_workers[wid] = rec

    def _start_worker(self, wid: str) -> None:
        self._set_state(wid, "starting")
        try:
            self.fleet.start(wid)
        except Exception:
            self.store.remove_worker(wid)
            self._known_workers.pop(wid, None)
            raise
        try:
            node = ray.get(self.fleet.handle(wid).device_info.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - informational only
            node = {}
        # a fresh worker's counters start at zero: count its first interval instead of using it as
        # a baseline, or the per-group token windows undercount (and show MoGE as imbalanced)
        self._last_stats[wid] = {"tokens": 0, "busy_s": 0.0, "group_tokens": {}, "_at": time.time()}
        rec = self.store.workers()[wid]
        rec.info = {"device": node.get("device"), "pid": node.get("pid"), "node_id": node.get("node_id"),
                    "resources": node.get("assigned_resources")}
        self.store.put_worker(rec)

    def sweep_strays(self) -> list[str]:
        """Stop worker actors that neither the placement nor the inventory knows: e.g. a replacement
        a replica started for a dead worker after the controller's repair had already moved its
        groups elsewhere. Only between operations, so a worker being added is never mistaken."""
        if not self._op_lock.acquire(blocking=False):
            return []
        try:
            p = self.store.placement()
            if p is None:
                return []
            known = set(p.workers) | set(self.store.workers())
            strays = [w for w in self.fleet.running() if w not in known]
            for wid in strays:
                log.warning("stopping stray worker %s (not in the placement or inventory)", wid)
                self.fleet.stop(wid)
            return strays
        finally:
            self._op_lock.release()

    def _standby(self, alive_only: bool = False) -> list[str]:
        ids = sorted((w for w, r in self.store.workers().items() if r.state == "standby"), key=_worker_order)
        return [w for w in ids if self.fleet.alive(w)] if alive_only else ids

    def replenish_standby(self) -> list[str]:
        """Keep `elastic.standby_workers` warm, empty workers: a scale-up then only loads groups.
        Dead standbys are forgotten; nothing happens while an operation holds the lock."""
        want = self.cfg.elastic.standby_workers
        if want == 0 and not self._standby():
            return []  # nothing to do: do not take the lock an admin scale may be asking for
        if not self._op_lock.acquire(blocking=False):
            return []
        try:
            for wid in self._standby():
                if not self.fleet.alive(wid):
                    self.fleet.stop(wid)
                    self.store.remove_worker(wid)
                    self._known_workers.pop(wid, None)
            started = []
            for wid in self._next_ids(max(0, want - len(self._standby()))):
                self._start_worker(wid)
                self._set_state(wid, "standby")
                started.append(wid)
            return started
        finally:
            self._op_lock.release()

    def devices(self, p: Placement | None = None) -> list[str]:
        """Serving workers: those in the placement plus any that hold nothing right now (a
        migration may empty a worker; it stays a device until scaled away)."""
        p = p or self.store.placement()
        serving = {w for w, r in self.store.workers().items() if r.state == "serving"}
        return sorted(set(p.workers if p else ()) | serving, key=_worker_order)

    def _next_ids(self, k: int) -> list[str]:
        used = set(self.store.workers()) | set(self.fleet.running())
        if self._known is not None:
            used |= set(self._known.workers)
        nums = [int(w[1:]) for w in used if w[1:].isdigit()]
        start = max(nums, default=-1) + 1
        return [f"w{start + i}" for i in range(k)]

    # ---- operations ---------------------------------------------------------------------------

    def _run(self, kind: str, new_groups: dict, added: list[str] = (), retired: list[str] = (),
             p: Placement | None = None) -> dict:
        p = p or self.store.placement()
        validate_map(new_groups, self.n_groups)
        op = Operation(kind, p.epoch, groups_of(p), new_groups, added_workers=list(added),
                       retired_workers=list(retired))
        op.detail["t"] = {"decision": op.started_at}
        self.store.begin_operation(op.to_dict())
        op = self.runner.run(op)
        self._settle_inventory(op)
        self.store.end_operation(op.op_id)
        now = self.store.placement()
        if now is not None:
            self._remember(now)
        return {"op_id": op.op_id, "kind": kind, "phase": op.phase.value, "error": op.error,
                "from_epoch": op.from_epoch, "epoch": now.epoch if now else None,
                "timeline": op.detail.get("t", {}), "workers": self.devices(now) if now else []}

    def scale(self, devices: int, reason: str = "admin") -> dict:
        """Grow or shrink to `devices` expert workers, live. Raises ControllerBusy / BadRequest."""
        if not isinstance(devices, int) or not self.section.min_devices <= devices <= self.section.max_devices:
            raise BadRequest(f"devices must be an integer in [{self.section.min_devices}, "
                             f"{self.section.max_devices}] (elastic.policy.min_devices/max_devices)")
        if not self._op_lock.acquire(blocking=False):
            raise ControllerBusy("another operation is in flight")
        try:
            t0 = time.time()
            p = self.store.placement()
            if p is None:
                raise BadRequest("no placement yet: the cluster has not been bootstrapped")
            current = self.devices(p)
            if devices == len(current):
                return {"phase": "noop", "epoch": p.epoch, "workers": current}
            if devices > len(current):
                need = devices - len(current)
                warm = self._standby(alive_only=True)[:need]
                added = warm + self._next_ids(need - len(warm))
                started = []
                try:
                    for wid in added[len(warm):]:
                        self._start_worker(wid)
                        started.append(wid)
                except Exception as e:
                    for wid in started:
                        self.ports.stop_worker(wid)
                    raise RuntimeError(f"could not start a worker for the new device: {e}") from e
                t_ready = time.time()
                for wid in warm:
                    self._set_state(wid, "starting")
                result = self._run("scale", plan_map(self.n_groups, current + added, groups_of(p)),
                                   added=added, p=p)
                result["timeline"]["worker_ready"] = t_ready
                result["from_standby"] = warm
            else:
                retired = current[devices:]
                for wid in retired:
                    self._set_state(wid, "draining")
                result = self._run("scale", plan_map(self.n_groups, current[:devices], groups_of(p)),
                                   retired=retired, p=p)
                if result["phase"] != "done":
                    for wid in retired:
                        self._set_state(wid, "serving")
            result["timeline"]["decision"] = t0
            if result["phase"] == "done":
                done_at = time.time()  # cooldown runs from when the new capacity serves
                self.policy.record_change(done_at)
                self.store.set_controller(last_scale_at=done_at, desired_devices=devices, last_reason=reason)
            return result
        finally:
            self._op_lock.release()

    def migrate(self, group: int, worker: str, replicate: bool = False) -> dict:
        """Move (or replicate) one group onto a serving worker, live."""
        if not self._op_lock.acquire(blocking=False):
            raise ControllerBusy("another operation is in flight")
        try:
            p = self.store.placement()
            if p is None:
                raise BadRequest("no placement yet")
            if not isinstance(group, int) or not 0 <= group < self.n_groups:
                raise BadRequest(f"group must be an integer in [0, {self.n_groups - 1}]")
            if worker not in self.devices(p):
                raise BadRequest(f"unknown worker {worker!r}; serving workers: {self.devices(p)}")
            new = move_group(groups_of(p), group, worker, replicate)
            if new == groups_of(p):
                return {"phase": "noop", "epoch": p.epoch, "workers": list(p.workers)}
            return self._run("migrate", new, p=p)
        finally:
            self._op_lock.release()

    def repair(self) -> dict | None:
        """Take dead workers out of the placement, reloading their groups on the living."""
        # Look before locking: pinging every worker takes up to seconds under load, and an admin
        # scale arriving meanwhile must not be told "busy" by a check that finds nothing dead.
        p = self.store.placement()
        if p is None or all(self.fleet.alive(w) for w in self.devices(p)):
            return None
        if not self._op_lock.acquire(blocking=False):
            return None
        try:
            p = self.store.placement()
            if p is None:
                return None
            devices = self.devices(p)
            dead = [w for w in devices if not self.fleet.alive(w)]
            if not dead:
                return None
            alive = [w for w in devices if w not in dead]
            added: list[str] = []
            if not alive:
                added = self._next_ids(1)
                self._start_worker(added[0])
            survivors = {g: tuple(h for h in hs if h not in dead) for g, hs in groups_of(p).items()}
            new = plan_map(self.n_groups, sorted(alive, key=_worker_order) + added, survivors)
            log.warning("repairing placement: dead workers %s", dead)
            result = self._run("repair", new, added=added, p=p)
            if result["phase"] == "done":
                for w in dead:
                    self.fleet.stop(w)
                    self.store.remove_worker(w)
            return result
        finally:
            self._op_lock.release()

    # ---- the periodic loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.section.period_s):
            try:
                self.tick()
                self._last_error = None
            except Exception as e:  # noqa: BLE001 - Redis down, a worker gone: try again next period
                self._last_error = f"{type(e).__name__}: {e}"
                log.warning("controller tick failed: %s", e)

    def tick(self) -> Decision | None:
        self._restore_if_empty()
        journal = self.store.operation()
        if journal is not None and not self._op_lock.locked():
            self._recover()
        self._collect_worker_samples()
        self.repair()
        self.sweep_strays()
        self.replenish_standby()
        if self.section.name == "none":
            return None
        p = self.store.placement()
        if p is None:
            return None
        ctx = ScalingContext(
            now=time.time(), window=self.store.window(self.section.window_s), devices=len(self.devices(p)),
            n_groups=self.n_groups, placement=groups_of(p),
            inventory={w: r.state for w, r in self.store.workers().items()},
        )
        decision = self.policy.decide(ctx)
        self._last_decision = decision
        if decision.devices != ctx.devices and not self._op_lock.locked():
            self.scale(decision.devices, reason=decision.reason)
        return decision

    def _restore_if_empty(self) -> None:
        """Redis restarted without persistence: put back what we know before anything else."""
        if self._known is None or self.store.placement() is not None:
            return
        log.warning("Redis has no placement: restoring epoch %d from the controller", self._known.epoch)
        floor = max(self.store.live_replicas(3600).values(), default=-1)
        p = self._known if self._known.epoch >= floor else Placement(floor + 1, self._known.holders)
        self.store.restore_placement(p)
        for rec in self._known_workers.values():
            self.store.put_worker(rec)
        if self.policy.last_change_at is not None:
            self.store.set_controller(last_scale_at=self.policy.last_change_at)

    def _collect_worker_samples(self) -> None:
        if self._known is None:
            return
        for wid in self.devices():
            self._sample_worker(wid)

    def _sample_last(self, wid: str) -> None:
        """A worker about to be stopped: record what it did since the last sample."""
        try:
            self._sample_worker(wid)
        except Exception as e:  # noqa: BLE001 - metrics never block a scale-down
            log.info("last sample of %s failed: %s", wid, e)
        self._last_stats.pop(wid, None)

    def _sample_worker(self, wid: str) -> None:
        now = time.time()
        try:
            s = ray.get(self.fleet.handle(wid).stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a dead worker shows up in repair()
            return
        prev = self._last_stats.get(wid)
        self._last_stats[wid] = {**s, "_at": now}
        if prev is None:
            return  # first look after a controller restart: a baseline only
        interval = max(now - prev["_at"], 1e-6)
        groups = {int(g): int(n) - int(prev["group_tokens"].get(g, 0)) for g, n in s["group_tokens"].items()}
        self.store.add_worker_sample(WorkerSample(
            wid, now, interval, tokens=int(s["tokens"]) - int(prev["tokens"]),
            busy_s=float(s["busy_s"]) - float(prev["busy_s"]),
            step_ms=(1000.0 * float(s.get("step_latency_s", 0.0)),), group_tokens=groups))

    # ---- reading ------------------------------------------------------------------------------

    def status(self) -> dict:
        p = self.store.placement()
        window = self.store.window(self.section.window_s)
        workers = {}
        for wid, rec in sorted(self.store.workers().items(), key=lambda kv: _worker_order(kv[0])):
            workers[wid] = {**asdict(rec), "groups": list(p.groups_of(wid)) if p else [],
                            "utilisation": window.utilisation().get(wid)}
        op = self.store.operation()
        return {
            "epoch": p.epoch if p else None,
            "placement": {str(g): list(hs) for g, hs in enumerate(p.holders)} if p else {},
            "devices": len(self.devices(p)) if p else 0,
            "standby": self._standby(),
            "workers": workers,
            "replicas": self.store.live_replicas(self.ports.replica_ttl_s),
            "operation": op,
            "group_tokens": window.group_tokens(),
            "group_imbalance": window.group_imbalance(self.n_groups),
            "tokens_per_s": window.tokens_per_s(),
            "ttft_p99_ms": window.ttft_p(99), "itl_p99_ms": window.itl_p(99),
            "policy": {"name": self.section.name, "min_devices": self.section.min_devices,
                       "max_devices": self.section.max_devices,
                       "last_decision": asdict(self._last_decision) if self._last_decision else None},
            "last_error": self._last_error,
            "started_at": self.started_at,
        }

    def consistency(self) -> list[str]:
        """Problems with the placement as it stands (empty = consistent): every group held, every
        holder alive and really holding what the placement says, no operation left in flight,
        inventory equal to the placement's workers, no stray worker actors."""
        problems: list[str] = []
        p = self.store.placement()
        if p is None:
            return ["no placement in Redis"]
        for wid in self.devices(p):
            try:
                held = set(ray.get(self.fleet.handle(wid).held_groups.remote(), timeout=10))
            except Exception as e:  # noqa: BLE001
                problems.append(f"worker {wid} unreachable: {type(e).__name__}")
                continue
            missing = set(p.groups_of(wid)) - held
            if missing:
                problems.append(f"worker {wid} lacks groups {sorted(missing)}")
        if self.store.operation() is not None:
            problems.append(f"operation still in flight: {self.store.operation().get('phase')}")
        inv = {w for w, r in self.store.workers().items() if r.state == "serving"}
        standby = set(self._standby())
        if not set(p.workers) <= inv or set(self.store.workers()) != inv | standby:
            problems.append(f"inventory {sorted(self.store.workers())} does not match placement workers "
                            f"{sorted(p.workers)} (all serving)")
        stray = set(self.fleet.running()) - inv - standby
        if stray:
            problems.append(f"stray worker actors {sorted(stray)}")
        return problems

    def placement(self) -> dict | None:
        p = self.store.placement()
        return p.to_dict() if p else None

    def set_test_load_delay(self, seconds: float) -> None:
        """Test hook: pause before each load so a test can kill the target mid-operation."""
        self.ports.load_delay_s = float(seconds)

    def ping(self) -> str:
        return "ok"

    def shutdown(self) -> None:
        self._stop.set()


def _worker_order(wid: str) -> tuple[int, str]:
    return (int(wid[1:]) if wid[1:].isdigit() else 1 << 30, wid)


HEAD_NODE_RESOURCE = "node:__internal_head__"  # what Ray puts on the head node only


def start_controller(config: MogeConfig, namespace: str | None = None) -> Any:
    """The detached controller actor (created once; a live one is returned as is)."""
    actor = ray.remote(ElasticController).options(
        name=CONTROLLER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, max_concurrency=16, num_cpus=0,
        # on the head node, like Serve's own controller: worker nodes come and go with scaling
        resources={HEAD_NODE_RESOURCE: 0.001},
    )
    return actor.remote(config.model_dump(mode="json"), namespace)


def get_controller(namespace: str | None = None) -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
