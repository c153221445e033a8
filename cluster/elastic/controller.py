"""The elastic controller: one detached Ray actor ("moge-controller", restarted by Ray on failure)
that owns the placement and the device inventory, keeps them in Redis, and runs the policy.

Every `period_s` it: puts its state back if Redis came back empty; finishes or rolls back a
journaled operation; turns worker stats into metric samples; replaces dead workers; stops strays;
keeps the standby workers warm; asks the guarded policy for a device count and scales to it.
This class only wires the jobs together; each lives in cluster/elastic/control/ (ports, operations,
recovery, standby, sampling, status) and the inventory in cluster/elastic/inventory.py. Operations
run one at a time through cluster/elastic/migration.py. A restarted controller rebuilds everything
from Redis (and, if Redis lost it too, from the live workers and the epochs the replicas report),
so killing it loses nothing (invariant 5).

One clock decides: `clock` (wall time, injectable) stamps every sample, journal entry and record,
and is the `now` every policy decision and cooldown sees; only bounded waits use the monotonic clock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray

from actors.experts.local_holder import LOCAL
from actors.experts.placement import Placement, groups_of, plan_groups
from actors.experts.worker.spec import model_config_of
from cluster.config import MogeConfig
from cluster.elastic.control.operations import BadRequest, ControllerBusy, Operations
from cluster.elastic.control.ports import RayPorts
from cluster.elastic.control.recovery import Recovery
from cluster.elastic.control.sampling import WorkerSampler
from cluster.elastic.control.standby import replenish_standby
from cluster.elastic.control.status import consistency, status
from cluster.elastic.inventory import Inventory, WorkerState
from cluster.elastic.migration import MigrationRunner
from cluster.elastic.policy.guarded import guarded_from_config
from cluster.elastic.policy.policies import Decision, ScalingContext, make_policy
from cluster.elastic.redis_server import connect
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet, model_spec

log = logging.getLogger(__name__)

CONTROLLER_NAME = "moge-controller"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # what Ray puts on the head node only

__all__ = ["BadRequest", "ControllerBusy", "ElasticController", "get_controller", "start_controller"]


class ElasticController:
    """Plain class; `start_controller` wraps it as the detached, restartable Ray actor."""

    def __init__(self, config: dict, namespace: str | None = None, run_loop: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        from cluster.security.serving_secrets import unseal

        self.cfg = MogeConfig.model_validate(unseal(config))
        el = self.cfg.elastic
        if not el.redis_url:
            raise ValueError("the controller needs elastic.redis_url (the embedded Redis sets it at start)")
        self.clock = clock
        self.store = ElasticStore(connect(el.redis_url, el.redis_password), el.key_prefix, clock=clock)
        self.fleet = WorkerFleet(self.cfg, namespace)
        self.inventory = Inventory(self.store, self.fleet, clock)
        self.sampler = WorkerSampler(self.store, self.fleet, clock)
        self.inventory.on_start = self.sampler.fresh
        self.sampler.on_new_pid = self.inventory.note_pids
        self.ports = RayPorts(self.fleet, self.store, clock, source=el.migration_source,
                              deadline_s=el.migration_deadline_s)
        self.ports.before_stop = self.sampler.sample_last
        self.runner = MigrationRunner(self.ports, ack_timeout_s=60.0)
        self.n_groups = model_config_of(model_spec(self.cfg)).n_groups
        self.section = el.policy
        self.policy = guarded_from_config(self.section, make_policy(self.section), clock=clock)
        self._op_lock = threading.Lock()  # one operation at a time
        self.ops = Operations(self.store, self.inventory, self.ports, self.runner, self.policy,
                              self.n_groups, self._op_lock, clock, local_groups=el.local_groups)
        self.recovery = Recovery(self.store, self.inventory, self.ports, self.runner, self.policy,
                                 self.n_groups, self._op_lock)
        self._last_decision: Decision | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self.started_at = clock()
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
            if p is None and self.cfg.elastic.local_groups:
                # one device: attention and every group in each replica; workers come with scale-ups
                self.store.publish_placement({g: (LOCAL,) for g in range(self.n_groups)}, None)
                p = self.store.placement()
            if p is None:
                ids = [f"w{i}" for i in range(n)]
                for wid in ids:
                    self.inventory.start_worker(wid)
                groups = plan_groups(self.n_groups, ids)
                for wid in ids:
                    self.ports.load(wid, sorted(g for g, hs in groups.items() if wid in hs), {})
                    self.inventory.set_state(wid, WorkerState.SERVING)
                self.store.publish_placement(groups, None)
                p = self.store.placement()
            self.inventory.remember(p)
            return p.to_dict()

    def _recover(self) -> None:
        self.recovery.recover()
        self._last_error = None

    # ---- operations (Ray actor methods the admin API, the CLI and the tests call) --------------

    def scale(self, devices: int, reason: str = "admin", source: str | None = None) -> dict:
        """Grow or shrink to `devices` expert workers, live. Raises ControllerBusy / BadRequest.
        `source` overrides elastic.migration_source for this operation."""
        return self.ops.scale(devices, reason, source)

    def migrate(self, group: int, worker: str, replicate: bool = False) -> dict:
        """Move (or replicate) one group onto a serving worker, live."""
        return self.ops.migrate(group, worker, replicate)

    def repair(self) -> dict | None:
        """Take dead or hung workers out of the placement, reloading their groups on the living."""
        return self.ops.repair(self.sampler.unanswered)

    def sweep_strays(self) -> list[str]:
        return self.recovery.sweep_strays()

    def replenish_standby(self) -> list[str]:
        return replenish_standby(self.inventory, self.cfg.elastic.standby_workers, self._op_lock)

    def devices(self, p: Placement | None = None) -> list[str]:
        return self.inventory.devices(p)

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
        self.recovery.restore_if_empty()
        if self.store.operation() is not None and not self._op_lock.locked():
            self._recover()
        suspects = None  # not sampled: the repair pings every device
        if self.inventory.known is not None:
            suspects = self.sampler.collect(self.devices())
        self.ops.repair(self.sampler.unanswered, suspects)
        self.sweep_strays()
        self.replenish_standby()
        if self.section.name == "none":
            return None
        p = self.store.placement()
        if p is None:
            return None
        ctx = ScalingContext(
            now=self.clock(), window=self.store.window(self.section.window_s), devices=len(self.devices(p)),
            n_groups=self.n_groups, placement=groups_of(p),
            inventory={w: r.state for w, r in self.store.workers().items()},
        )
        decision = self.policy.decide(ctx)
        self._last_decision = decision
        if decision.devices != ctx.devices and not self._op_lock.locked():
            self.scale(decision.devices, reason=decision.reason)
        return decision

    # ---- reading ------------------------------------------------------------------------------

    def status(self) -> dict:
        out = status(self.inventory, self.section, self.n_groups, self.ports.replica_ttl_s,
                     self._last_decision, self._last_error, self.started_at)
        if out["operation"] is None and self.ops.preparing is not None:  # not journaled yet
            out["operation"] = dict(self.ops.preparing)
        return out

    def consistency(self) -> list[str]:
        return consistency(self.inventory)

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


def start_controller(config: MogeConfig, namespace: str | None = None) -> Any:
    """The detached controller actor (created once; a live one is returned as is)."""
    actor = ray.remote(ElasticController).options(
        name=CONTROLLER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, max_concurrency=16, num_cpus=0,
        # on the head node, like Serve's own controller: worker nodes come and go with scaling
        resources={HEAD_NODE_RESOURCE: 0.001},
    )
    from cluster.security.serving_secrets import seal

    return actor.remote(seal(config.model_dump(mode="json")), namespace)  # no secret in the actor's args


def get_controller(namespace: str | None = None) -> Any:
    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
