"""The elastic store against a real redis-server (embedded, 127.0.0.1, password)."""

from __future__ import annotations

import threading

import pytest
import redis

from cluster.elastic.metrics_window import ReplicaSample, WorkerSample
from cluster.elastic.redis_server import EmbeddedRedis, connect
from cluster.elastic.store import ElasticStore, EpochConflict, WorkerRecord

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    srv = EmbeddedRedis().start()
    yield srv
    srv.stop()


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def store(server, request):
    clock = Clock()
    s = ElasticStore(connect(server.url), prefix=f"t{abs(hash(request.node.name))}", clock=clock)
    s.clock_obj = clock
    return s


def test_password_is_required(server):
    anon = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anon.ping()
    with pytest.raises(redis.AuthenticationError):
        connect(server.url.replace(server.password, "wrong")).ping()


def test_placement_compare_and_set_and_notification(store):
    sub = store.r.pubsub()
    sub.subscribe(store.epoch_channel)
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    assert store.placement() is None
    assert store.publish_placement({0: ["w0"], 1: ["w0"]}, None) == 0
    assert store.publish_placement({0: ["w0"], 1: ["w1"]}, 0) == 1
    with pytest.raises(EpochConflict):
        store.publish_placement({0: ["w1"], 1: ["w1"]}, 0)  # stale writer
    p = store.placement()
    assert p.epoch == 1 and p.holders == (("w0",), ("w1",))
    got = [sub.get_message(timeout=2)["data"] for _ in range(2)]
    assert got == ["0", "1"]
    assert [e["epoch"] for e in store.placement_log()] == [1, 0]
    sub.close()


def test_two_concurrent_writers_cannot_both_write_the_next_epoch(store):
    store.publish_placement({0: ["w0"]}, None)
    results: list = []
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            results.append(store.publish_placement({0: [f"w{i}"]}, 0))
        except EpochConflict:
            results.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results, key=str) == [1] + ["conflict"] * 7
    assert store.epoch() == 1


def test_restore_never_overwrites_a_newer_placement(store):
    store.publish_placement({0: ["a"]}, None)
    store.publish_placement({0: ["b"]}, 0)
    from actors.experts.placement import Placement
    store.restore_placement(Placement(0, (("a",),)))
    assert store.placement().epoch == 1
    store.r.delete(store.key("placement"))  # Redis came back empty
    store.restore_placement(Placement(7, (("c",),)))
    assert store.placement() == Placement(7, (("c",),))


def test_acks_and_liveness(store):
    store.ack_epoch("r0", 3)
    store.clock_obj.t += 5
    store.ack_epoch("r1", 4)
    store.heartbeat("r2")
    assert store.live_replicas(ttl_s=10) == {"r0": 3, "r1": 4, "r2": -1}
    assert store.live_replicas(ttl_s=2) == {"r1": 4, "r2": -1}
    store.forget_replica("r1")
    assert "r1" not in store.live_replicas(ttl_s=10)


def test_inventory_and_operation_journal(store):
    store.put_worker(WorkerRecord("w0", "moge-expert-w0", state="serving", created_at=1.0))
    store.put_worker(WorkerRecord("w1", "moge-expert-w1"))
    assert store.workers()["w0"].state == "serving" and store.workers()["w1"].state == "starting"
    store.remove_worker("w1")
    assert list(store.workers()) == ["w0"]

    store.begin_operation({"op_id": "a", "phase": "planned"})
    with pytest.raises(RuntimeError, match="already in flight"):
        store.begin_operation({"op_id": "b", "phase": "planned"})
    store.update_operation({"op_id": "a", "phase": "published"})
    store.end_operation("b")  # not ours: untouched
    assert store.operation()["phase"] == "published"
    store.end_operation("a")
    assert store.operation() is None

    store.set_controller(last_scale_at=12.5, desired_devices=3)
    assert store.controller() == {"last_scale_at": 12.5, "desired_devices": 3}
    for kind, outcome in [("scale_up", "done"), ("scale_up", "done"), ("migrate", "rolled_back")]:
        store.count_operation(kind, outcome)
    assert store.operation_counts() == {("scale_up", "done"): 2, ("migrate", "rolled_back"): 1}
    assert store.controller()["desired_devices"] == 3  # the counters live beside the state, apart


def test_metric_windows_and_trimming(store):
    store.metrics_retention_s = 100
    for t in range(0, 300, 10):
        store.clock_obj.t = 1000 + t
        store.add_replica_sample(ReplicaSample("r0", store.clock_obj.t, queue=t, ttft_ms=(float(t),)))
        store.add_worker_sample(WorkerSample("w0", store.clock_obj.t, 10.0, tokens=10, busy_s=5.0,
                                             group_tokens={0: 10}))
    w = store.window(30)  # (1260, 1290]
    assert [s.ts for s in w.replicas] == [1270.0, 1280.0, 1290.0]
    assert w.queue() == 290 and w.ttft_p(100) == 290.0
    assert w.group_tokens() == {0: 30} and w.mean_utilisation() == pytest.approx(0.5)
    # samples older than the retention are gone from Redis, not only filtered
    assert store.r.zcard(store.key("metrics", "replica")) == 11


def test_a_killed_embedded_redis_is_restarted_with_its_data_and_clients_reconnect(tmp_path):
    import os
    import signal
    import time

    from actors.experts.placement import Placement

    srv = EmbeddedRedis(data_dir=str(tmp_path / "redis")).start().supervise(poll_s=0.05)
    try:
        store = ElasticStore(connect(srv.url, socket_timeout_s=1.0), prefix="sup")
        store.restore_placement(Placement(7, (("w0",), ("w1",))))
        old_pid = srv.process.pid
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        placement = None
        while time.monotonic() < deadline:  # the same client object, retried: it must reconnect
            try:
                placement = store.placement()
                break
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        assert placement is not None and placement.epoch == 7 and placement.holders == (("w0",), ("w1",))
        # the supervisor counts the restart once the new server answers: clients may get there first
        while srv.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.restarts == 1 and srv.process.pid != old_pid
    finally:
        srv.stop()
    assert not srv.running()


def test_a_redis_server_outlives_the_thread_that_started_it():
    """PR_SET_PDEATHSIG is tied to the forking thread: a redis-server started (or restarted by the
    supervisor) on a thread that later exits must keep running while its process lives."""
    import subprocess

    srv = EmbeddedRedis()
    starter = threading.Thread(target=srv.start)
    starter.start()
    starter.join(30)
    try:
        assert srv.running()
        with pytest.raises(subprocess.TimeoutExpired):  # the bug: SIGTERM on the thread's exit, gone in ms
            srv.process.wait(timeout=2)
        srv.supervise(poll_s=0.05).stop_supervising()  # the supervisor thread is replaced, as tests do
        srv.supervise(poll_s=0.05)
        with pytest.raises(subprocess.TimeoutExpired):
            srv.process.wait(timeout=1)
        assert connect(srv.url).ping() and srv.restarts == 0
    finally:
        srv.stop()
    assert not srv.running()


def test_a_password_redis_server_would_read_as_an_option_is_refused_and_one_dash_works():
    with pytest.raises(ValueError, match="must not start with '--'"):
        EmbeddedRedis(password="--looks-like-an-option").start()
    srv = EmbeddedRedis(password="-one-dash").start()
    try:
        assert connect(srv.url).ping()
    finally:
        srv.stop()
