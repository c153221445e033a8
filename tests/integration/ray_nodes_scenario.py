"""Devices arriving and leaving as Ray nodes, as with KubeRay and the Ray autoscaler, on one machine.

    PYTHONPATH=. flock /tmp/moge-cpu.lock timeout 300 python -m tests.integration.ray_nodes_scenario --out r.json

A multi-node Ray cluster (ray.cluster_utils.Cluster) whose head carries one device slot (the custom
resource `expert_slot`, standing in for {"NPU": 1} or a GPU); expert workers ask for one slot each.
Under continuous greedy load on a real attention replica engine (the objects a Serve replica
builds: LLMEngine + AsyncEngine + Dispatcher + epoch listener) and the real controller actor.
The test plays the autoscaler: it adds a node when the cluster reports a pending demand for a slot
and removes a node once nothing runs on it.

  grow     scale 1 -> 2 is asked for while no node has a free slot: the new worker is pending and
           the cluster reports the demand the autoscaler reads; a node with a slot joins; the
           worker lands there and the controller moves groups onto it.
  shrink   scale 2 -> 1: the new node's worker hands its groups back and is stopped; the idle
           node is removed.
  lose     (--lose-node) grow again, then the node is killed without warning while its worker holds
           groups; the replacement worker is pending until the autoscaler's replacement node joins,
           and the steps that hit the dead worker are re-sent to it (invariant 4).

Prints (and with --out writes) one JSON object that tests/integration/test_ray_nodes.py asserts on.
It runs in its own process because the rest of the integration suite shares one single-node Ray
session per pytest process, and a driver can belong to only one cluster. RAY_TMPDIR points at a
private directory so this cluster's address file never captures another process's `ray.init()`;
RAY_ADDRESS names this cluster once it runs, so nothing resolves an implicit address by scanning the
machine for Ray processes (another Ray instance on the machine made that ambiguous: "Found multiple
active Ray instances"); and the cluster has its own auth token (a 0600 file in the private dir).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
SLOT = "expert_slot"  # the device resource; a KubeRay worker group would advertise {"NPU": 1} or a GPU
NAMESPACE = "moge"
PROMPTS = [f"node {i}: devices come and go" for i in range(6)]
MAX_TOKENS = 10
# Node death is found by GCS health checks (default ~15 s); a dead raylet refuses connections at
# once, so a short period only shortens the abrupt-loss phase. The threshold keeps a busy but live
# raylet (2 shared cores) from being declared dead.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def scenario_config():
    from cluster.config import MogeConfig

    return MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": 16, "num_kv_blocks": 256},
        data_plane={"transport": "grpc", "num_workers": 1, "worker_num_cpus": 0.5,
                    "worker_resources": {SLOT: 1}, "ping_pong": False, "advertise_host": "127.0.0.1"},
        elastic={"key_prefix": "ray-nodes", "policy": {"name": "none", "min_devices": 1, "max_devices": 2,
                                                         "period_s": 0.5}},
    )


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def slot_demand(gcs_address: str) -> float:
    """Device slots that tasks/actors wait for, as the Ray autoscaler reads them from the GCS."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address)
    return sum(r.bundle.get(SLOT, 0) * r.count
               for d in status.resource_demands.ray_task_actor_demand for r in d.bundles_by_count)


def node_alive(node_id: str) -> bool | None:
    import ray

    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return bool(n["Alive"])
    return None


def actor_node(name: str) -> str | None:
    """Node id of the live named actor (None when there is no such actor)."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
    return ray.get(handle.device_info.remote(), timeout=30)["node_id"]


class NodesScenario:
    def __init__(self, concurrency: int, out: dict[str, Any]) -> None:
        self.concurrency = concurrency
        self.out = out
        self.out["events"] = {}
        self.t0 = time.monotonic()
        self.cluster = self.stack = self.replica = self.async_engine = self.load = None
        self.expected: dict[str, list[int]] = {}

    def mark(self, event: str) -> None:
        self.out["events"][event] = round(time.monotonic() - self.t0, 2)

    def ctl(self, method: str, *args, timeout: float = 180) -> Any:
        import ray

        return ray.get(getattr(self.stack.controller, method).remote(*args), timeout=timeout)

    # ---- phases ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Head node with one slot, the elastic stack with w0 on it, a replica engine under load."""
        import ray
        from ray.cluster_utils import Cluster

        from actors.engine.async_engine import AsyncEngine
        from actors.weights.loader import load_model
        from actors.model.reference import greedy_reference
        from cluster.replica.elastic_side import ElasticReplica
        from cluster.replica.assemble import build_engine
        from cluster.elastic.stack import start_elastic
        from tests.integration.ray_nodes_load import GreedyLoad

        config = scenario_config()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {SLOT: 1}, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
        os.environ["RAY_ADDRESS"] = self.cluster.address  # every implicit lookup finds this cluster only
        ray.init(address=self.cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        self.out["head_node_id"] = self.cluster.head_node.node_id
        self.stack = start_elastic(config, namespace=NAMESPACE)
        self.out["w0_node_id"] = self.ctl("status")["workers"]["w0"]["info"].get("node_id")
        self.mark("elastic_up")

        self.replica = ElasticReplica.connect(self.stack.config, "nodes-replica")
        engine, loaded = build_engine(self.stack.config, experts=self.replica.experts)
        self.async_engine = AsyncEngine(engine)
        self.replica.attach(self.async_engine)
        m = config.model
        reference = load_model(m.source, m.dtype, "cpu", n_groups=m.n_groups, seed=m.seed, name=m.name)
        self.expected = {p: greedy_reference(reference, loaded.tokenizer.encode(p), MAX_TOKENS) for p in PROMPTS}
        self.load = GreedyLoad(self.async_engine, loaded.tokenizer, PROMPTS, MAX_TOKENS, self.concurrency).start()
        self.load.wait_for(self.concurrency)
        self.mark("load_running")

    def start_scale(self, devices: int, before: set, timeout_s: float) -> tuple[Any, str]:
        """scale(devices) in flight and the id of the worker record it made. A ControllerBusy
        answer (the controller's own period holds the operation lock: a standby refill or a
        liveness repair on a loaded machine) is retried until the deadline."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = self.stack.controller.scale.remote(devices)
            while time.monotonic() < deadline:
                new = sorted(set(self.ctl("status")["workers"]) - before)
                if new:
                    return pending, new[0]
                if ray.wait([pending], timeout=0.1)[0]:
                    try:
                        ray.get(pending)
                    except ray.exceptions.RayTaskError as exc:
                        if "ControllerBusy" in str(exc):
                            break
                        raise
                    raise RuntimeError("the scale finished without a new worker record")
        raise TimeoutError(f"timed out after {timeout_s}s waiting for a new worker record")

    def grow(self, key: str) -> tuple[Any, str]:
        """Scale up by one device before a node has room for it, then add the node it waits for.
        -> (the node, the new worker's id)."""
        import ray

        before = set(self.ctl("status")["workers"])
        pending, new = self.start_scale(len(before) + 1, before, 60)
        demand = wait_until(lambda: slot_demand(self.cluster.address), 60, "the autoscaler to see a slot demand")
        served = self.load.wait_for(2)  # serving goes on while the device is awaited
        r: dict[str, Any] = {"worker": new, "slot_demand": demand, "served_while_pending": served,
                             "scale_finished_before_node": bool(ray.wait([pending], timeout=0)[0])}
        node_added_at = time.time()
        node = self.cluster.add_node(num_cpus=1, resources={SLOT: 1})
        self.mark(f"{key}_node_added")
        up = ray.get(pending, timeout=180)
        self.mark(f"{key}_scaled_up")
        status = self.ctl("status")
        before_n = len(self.load.results)
        self.load.wait_for(self.concurrency)  # requests served with groups on the new node
        r.update(node_id=node.node_id, phase=up["phase"], error=up["error"], workers=up["workers"],
                 ready_after_node=up["timeline"].get("worker_ready", 0) >= node_added_at,
                 node_in_status=status["workers"][new]["info"].get("node_id"),
                 node_of_actor=actor_node(f"moge-expert-{new}"), groups=status["workers"][new]["groups"],
                 requests_on_both_nodes=len(self.load.results) - before_n,
                 worker_tokens=ray.get(ray.get_actor(f"moge-expert-{new}", namespace=NAMESPACE).stats.remote(),
                                       timeout=30)["tokens"])
        self.out[key] = r
        return node, new

    def shrink(self, node: Any, worker: str) -> None:
        """Scale back to one device (the new node's worker goes), then remove the idle node."""
        down = self.ctl("scale", 1)
        self.mark("scaled_down")
        gone = wait_until(lambda: actor_node(f"moge-expert-{worker}") is None and "gone", 30, f"{worker} to stop")
        r: dict[str, Any] = {"phase": down["phase"], "error": down["error"], "workers": down["workers"],
                             "phases": sorted(down["timeline"], key=down["timeline"].get),
                             "worker_gone": gone == "gone", "holders": self.ctl("placement")["holders"],
                             "replica_epoch": self.replica.epoch, "epoch": self.ctl("placement")["epoch"]}
        self.cluster.remove_node(node)
        wait_until(lambda: node_alive(node.node_id) is False, 60, "the removed node to be marked dead")
        self.mark("node_removed")
        before = len(self.load.results)
        self.load.wait_for(self.concurrency)
        r["requests_after_removal"] = len(self.load.results) - before
        self.out["shrink"] = r

    def lose(self, node: Any, worker: str) -> None:
        """Kill `node` (holding `worker`'s groups) without warning; the autoscaler replaces it."""
        retries_before = self.replica.experts.retries
        done_before = len(self.load.results)
        self.cluster.remove_node(node, allow_graceful=False)
        self.mark("node_killed")
        # The replica's replacement worker waits for a slot: the same demand brings a new node.
        demand = wait_until(lambda: slot_demand(self.cluster.address), 90, "a demand for the lost slot")
        replacement = self.cluster.add_node(num_cpus=1, resources={SLOT: 1})
        self.mark("replacement_node_added")
        self.load.wait_for(2 * self.concurrency, timeout_s=180)
        self.mark("serving_after_loss")
        # Either the replica's replacement kept serving the groups, or the controller's repair moved
        # them to the survivors first (then it stopped the replacement): both are a healthy end.
        wait_until(lambda: self.ctl("consistency") == [], 120, "a consistent placement after the loss")
        self.out["lose"] = {
            "node_id": node.node_id, "replacement_node_id": replacement.node_id, "slot_demand": demand,
            "retries": self.replica.experts.retries - retries_before,
            "requests_since_loss": len(self.load.results) - done_before,
            "workers": sorted(self.ctl("status")["workers"]),
            "worker_node_now": actor_node(f"moge-expert-{worker}"),
        }

    def finish(self) -> None:
        self.load.stop()
        self.mark("load_stopped")
        wait_until(lambda: self.ctl("consistency") == [], 60, "a consistent placement")
        self.out["consistency"] = self.ctl("consistency")
        self.out["devices"] = self.ctl("status")["devices"]
        self.out["requests"] = len(self.load.results)
        self.out["n_failures"] = len(self.load.failures)
        self.out["failures"] = self.load.failures[:10]
        wrong = [(r.prompt, r.token_ids, self.expected[r.prompt]) for r in self.load.results
                 if r.token_ids != self.expected[r.prompt]]
        self.out["n_wrong_tokens"] = len(wrong)
        self.out["wrong_examples"] = wrong[:3]
        self.out["expected_nonempty"] = all(len(v) > 0 for v in self.expected.values())

    def close(self) -> None:
        import ray

        if self.load is not None:
            self.load.stop(30)
            self.out.setdefault("n_failures", len(self.load.failures))
        for step in (lambda: self.async_engine.shutdown(), lambda: self.replica.close(), lambda: self.stack.stop()):
            try:
                step()
            except Exception:  # noqa: BLE001 - tear down as much as possible (None parts included)
                pass
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.out["seconds"] = round(time.monotonic() - self.t0, 1)


def run(concurrency: int, lose_node: bool, out: dict[str, Any]) -> None:
    """Fill `out` phase by phase (so a failure still shows how far it got)."""
    s = NodesScenario(concurrency, out)
    try:
        s.start()
        node, worker = s.grow("grow")
        s.shrink(node, worker)
        if lose_node:
            node, worker = s.grow("regrow")
            s.lose(node, worker)
        s.finish()
    finally:
        s.close()


def isolate_ray(tmp_root: str) -> None:
    """This process (and every Ray process it starts) uses its own Ray temp dir and no inherited
    cluster address; workers import this checkout."""
    os.environ["RAY_TMPDIR"] = tmp_root
    os.environ.pop("RAY_ADDRESS", None)
    token = Path(tmp_root) / "auth_token"  # this cluster's own token, not the user's ~/.ray/auth_token
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--lose-node", action="store_true", help="also kill a node that holds groups")
    args = ap.parse_args(argv)
    tmp_root = tempfile.mkdtemp(prefix="moge-rn-", dir="/tmp")  # short: Ray's socket paths live under it
    isolate_ray(tmp_root)
    result: dict[str, Any] = {}
    try:
        run(args.concurrency, args.lose_node, result)
    except Exception as e:  # noqa: BLE001 - reported as data, so the test shows what broke
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    text = json.dumps(result, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
