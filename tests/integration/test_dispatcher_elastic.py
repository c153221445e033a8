"""The Dispatcher under the elastic controller, on a real local Ray, real redis-server and gRPC
expert workers (CPU, gloo): replicas assembled as a Serve replica assembles one (cluster/replica/),
concurrent greedy streams against the single-process model's tokens.

- the step lane through scale 2 -> 3, a migration, scale 3 -> 2 and a worker killed under load
  (the gRPC stream through a migration and a kill): 0 failed requests, identical tokens;
- a hung worker (SIGSTOP) under load, per call and over the step lane, ping-pong on and off, with
  the default data-plane settings: every stream stalls at most 2 s (one latency-derived deadline,
  then the replica's warm failover copy; nothing waits on a worker already marked down), 0 failed,
  identical tokens. Two replicas (two combinations) share each stop.

    unshare -n bash -c 'ip link set lo up && exec timeout 900 python -m pytest -q tests/integration/test_dispatcher_elastic.py'
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import ray

from actors.engine.sampling_params import SamplingParams
from actors.model.reference import greedy_reference
from cluster.config import MogeConfig
from tests.integration.test_data_plane import with_data_plane
from tests.integration.test_elastic import PROMPTS, Load, ctl, wait_until

pytestmark = pytest.mark.integration

MAX_TOKENS = 10
STREAMS = 4  # per replica
STALL_LIMIT_S = 2.0
STOP_REQUESTS = 2 * STREAMS  # requests each replica finishes while the worker is stopped


def start_stack(transport: str, max_devices: int, tmp_path_factory):
    """The elastic control plane (redis-server, controller, 2 workers over `transport`), tiny-moge on CPU."""
    from cluster.elastic.stack import start_elastic

    config = MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": 16, "num_kv_blocks": 256},
        data_plane={"transport": transport, "num_workers": 2, "worker_num_cpus": 0.25, "advertise_host": "127.0.0.1"},
        elastic={"key_prefix": f"dispatcher-{transport}-{uuid.uuid4().hex[:6]}",
                 "policy": {"name": "none", "min_devices": 1, "max_devices": max_devices, "period_s": 0.5}},
    )
    return start_elastic(config, namespace=f"dispatcher-{uuid.uuid4().hex[:6]}",
                         redis_data_dir=str(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="module")
def stack(ray_local, tmp_path_factory):
    s = start_stack("grpc", 4, tmp_path_factory)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def expected(reference_model):
    tok = reference_model.tokenizer
    return {p: greedy_reference(reference_model, tok.encode(p), MAX_TOKENS) for p in PROMPTS}


class Replica:
    """An elastic replica (Dispatcher, epoch listener) with its engine's step thread, as
    cluster/serve/app.py runs one."""

    def __init__(self, stack, **data_plane) -> None:
        from actors.engine.async_engine import AsyncEngine
        from cluster.replica.assemble import build_engine
        from cluster.replica.elastic_side import ElasticReplica
        from cluster.replica.plan import plan_of

        self.config = with_data_plane(stack.config, **data_plane)
        self.plan = plan_of(self.config)
        self.er = ElasticReplica.connect(self.config, f"r-{uuid.uuid4().hex[:6]}", namespace=stack.namespace,
                                         plan=self.plan)
        engine, self.loaded = build_engine(self.config, self.er.experts, self.plan)
        self.engine = AsyncEngine(engine)
        self.er.attach(self.engine)

    def close(self) -> None:
        self.engine.shutdown()
        self.er.close()


class Streams(Load):
    """test_elastic's load on one replica, each request also with the longest gap between two of
    its outputs (the first one included) and when it ended."""

    def __init__(self, replica: Replica, n: int = STREAMS) -> None:
        super().__init__(replica.engine, replica.loaded.tokenizer, n)
        self.results: list[tuple[str, list[int], float, float]] = []  # prompt, ids, worst gap, end

    async def _one(self, slot: int) -> None:
        k = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(slot + k) % len(PROMPTS)]
            rid, k = f"s{slot}-{k}-{uuid.uuid4().hex[:4]}", k + 1
            ids: list[int] = []
            last, gap = time.monotonic(), 0.0
            try:
                async for out in self.engine.generate(rid, self.tok.encode(prompt),
                                                      SamplingParams(temperature=0, max_tokens=MAX_TOKENS)):
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    ids.extend(out.new_token_ids)
                    if out.finished and out.finish_reason not in ("stop", "length"):
                        self.failures.append(f"{rid}: finish_reason {out.finish_reason}")
                self.results.append((prompt, ids, gap, last))
            except Exception as e:  # noqa: BLE001 - every failure is counted, none tolerated
                self.failures.append(f"{rid}: {type(e).__name__}: {e}")

    def check(self, expected) -> None:
        assert self.failures == []
        wrong = [(p, ids) for p, ids, _, _ in self.results if ids != expected[p]]
        assert self.results and wrong == [], f"{len(wrong)} of {len(self.results)} requests changed tokens"


def _steady(stack) -> None:
    wait_until(lambda: ctl(stack, "consistency") == [], 60, "a consistent placement")


@pytest.mark.parametrize("pairing", [("off", True, "lane", False), ("off", False, "lane", True)],
                         ids=["percall-pp+lane", "percall+lane-pp"])
def test_a_hung_worker_costs_every_stream_at_most_one_deadline(stack, expected, pairing):
    """Default data-plane settings but for the carrier and ping-pong under test."""
    _steady(stack)
    if ctl(stack, "status")["devices"] != 2:
        assert ctl(stack, "scale", 2)["phase"] == "done"
    a_step, a_pp, b_step, b_pp = pairing
    replicas = [Replica(stack, per_step=a_step, ping_pong=a_pp), Replica(stack, per_step=b_step, ping_pong=b_pp)]
    try:
        victim = sorted(w for hs in ctl(stack, "placement")["holders"] for w in hs)[-1]
        handle = ray.get_actor(f"moge-expert-{victim}", namespace=stack.namespace)
        pid = ray.get(handle.device_info.remote(), timeout=30)["pid"]
        loads = [Streams(r) for r in replicas]
        for load in loads:
            load.__enter__()
        try:
            for load in loads:
                load.wait_for(2 * STREAMS)  # warm: the deadline has learnt the call latency
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                for load in loads:  # serving goes on while the worker is stopped
                    load.wait_for(STOP_REQUESTS, timeout_s=90)
            finally:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass  # the replacement already killed the hung process
            resumed_at = time.monotonic()
            for load in loads:
                load.wait_for(STREAMS)
        finally:
            for load in loads:
                load.__exit__()
        for replica, load in zip(replicas, loads):
            load.check(expected)
            during = [gap for _, _, gap, end in load.results if end >= stopped_at]
            worst = max(during)
            print(f"{replica.plan.describe()}: SIGSTOP {resumed_at - stopped_at:.1f}s, {len(during)} requests, "
                  f"worst stall {worst:.2f}s, deadline {replica.er.experts.call_deadline_s():.2f}s")
            assert len(during) >= STOP_REQUESTS
            assert worst <= STALL_LIMIT_S, (replica.plan.describe(), worst)
    finally:
        for replica in replicas:
            replica.close()
    _steady(stack)


@pytest.mark.parametrize("per_step", ["stream", "lane"])  # after the stops: a kill ends each
def test_per_step_carrier_under_scale_migrate_and_a_kill(stack, expected, per_step):
    _steady(stack)
    if ctl(stack, "status")["devices"] != 2:
        assert ctl(stack, "scale", 2)["phase"] == "done"
    replica = Replica(stack, per_step=per_step)
    try:
        with Streams(replica, 6) as load:
            load.wait_for(6)
            steps = [ctl(stack, "scale", 3)] if per_step == "lane" else []  # the stream: migrate and kill only
            load.wait_for(3)
            p = ctl(stack, "placement")
            holder = p["holders"][0][0]
            other = next(w for hs in p["holders"] for w in hs if w != holder)
            steps.append(ctl(stack, "migrate", 0, other))
            load.wait_for(3)
            if per_step == "lane":
                steps.append(ctl(stack, "scale", 2))
                load.wait_for(3)
            victim = sorted(w for hs in ctl(stack, "placement")["holders"] for w in hs)[-1]
            handle = ray.get_actor(f"moge-expert-{victim}", namespace=stack.namespace)
            ray.kill(handle, no_restart=True)
            load.wait_for(12)
        assert [s["phase"] for s in steps] == ["done"] * len(steps), steps
        load.check(expected)
        m = replica.er.experts.metrics()
        assert replica.er.epoch >= steps[-1]["epoch"] and m["graph_replays"] == 0  # CPU: eager steps
    finally:
        replica.close()
    _steady(stack)
