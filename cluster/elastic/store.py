"""The elastic state and metrics store in Redis.

Everything the controller must not lose lives here (invariant 5): the placement and its epoch, the
device inventory (expert workers), the journal of the one in-flight operation, and controller
state such as the time of the last scaling action. Attention replicas and workers write windowed
metrics here and replicas acknowledge the epoch they adopted.

Keys (prefix P, default "moge"):
  P:placement           hash  epoch, groups (json {group: [worker ids]}), ts
  P:placement:log       list  json of recent placements, newest first (status, debugging)
  P:epochs              channel  a new epoch number is published here on every change
  P:replicas:epoch      hash  replica id -> epoch it has adopted
  P:replicas:seen       zset  replica id -> last heartbeat (seconds)
  P:workers             hash  worker id -> json WorkerRecord (states: cluster/elastic/inventory.py)
  P:operation           str   json of the in-flight operation (journal), absent when idle
  P:controller          hash  controller state (last_scale_at, desired_devices, ...) and operation
                              counters (ops:<kind>:<outcome> -> n)
  P:metrics:replica     zset  score = ts, member = json ReplicaSample
  P:metrics:worker      zset  score = ts, member = json WorkerSample
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import redis

from actors.experts.placement import Groups, Placement, groups_of, to_placement
from cluster.elastic.metrics_window import MetricsWindow, ReplicaSample, WorkerSample


class EpochConflict(RuntimeError):
    """Someone else wrote the placement since it was read: the caller must re-read and re-plan."""


@dataclass
class WorkerRecord:
    """One expert worker = one device in the inventory."""

    worker_id: str
    actor_name: str
    state: str = "starting"  # a WorkerState value (cluster/elastic/inventory.py); removed when stopped
    node_id: str | None = None
    created_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _groups_to_json(groups: Mapping[int, Sequence[str]]) -> str:
    return json.dumps({str(g): list(ws) for g, ws in sorted(groups.items())})


def _groups_from_json(text: str) -> Groups:
    return {int(g): tuple(ws) for g, ws in json.loads(text).items()}


class ElasticStore:
    def __init__(self, client: redis.Redis, prefix: str = "moge",
                 clock: Callable[[], float] = time.time, metrics_retention_s: float = 600.0,
                 metrics_max_samples: int = 20_000) -> None:
        self.r = client
        self.p = prefix
        self.clock = clock
        self.metrics_retention_s = metrics_retention_s
        self.metrics_max_samples = metrics_max_samples

    def key(self, *parts: str) -> str:
        return ":".join((self.p, *parts))

    @property
    def epoch_channel(self) -> str:
        return self.key("epochs")

    def ping(self) -> bool:
        return bool(self.r.ping())

    # -- placement ------------------------------------------------------------------------------

    def placement(self) -> Placement | None:
        h = self.r.hgetall(self.key("placement"))
        if not h or "groups" not in h:
            return None
        return to_placement(int(h["epoch"]), _groups_from_json(h["groups"]))

    def epoch(self) -> int | None:
        e = self.r.hget(self.key("placement"), "epoch")
        return None if e is None else int(e)

    def publish_placement(self, groups: Mapping[int, Sequence[str]], expected_epoch: int | None) -> int:
        """Compare-and-set: write epoch expected+1 only if the stored epoch is still `expected_epoch`
        (None = no placement yet). Publishes the new epoch on the channel in the same transaction.
        Raises EpochConflict when another writer got there first."""
        key = self.key("placement")
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                current = pipe.hget(key, "epoch")
                current_epoch = None if current is None else int(current)
                if current_epoch != expected_epoch:
                    raise EpochConflict(f"placement epoch is {current_epoch}, expected {expected_epoch}")
                new_epoch = 0 if expected_epoch is None else expected_epoch + 1
                text = _groups_to_json(groups)
                now = self.clock()
                pipe.multi()
                pipe.hset(key, mapping={"epoch": new_epoch, "groups": text, "ts": now})
                pipe.lpush(self.key("placement", "log"), json.dumps({"epoch": new_epoch, "groups": json.loads(text), "ts": now}))
                pipe.ltrim(self.key("placement", "log"), 0, 49)
                pipe.publish(self.epoch_channel, str(new_epoch))
                pipe.execute()
            except redis.WatchError as e:
                raise EpochConflict("placement changed during the write") from e
        return new_epoch

    def restore_placement(self, placement: Placement) -> None:
        """Put back a placement the controller knows when Redis came back empty (no persistence).
        Only writes if there is no placement at all, so it never overwrites a newer epoch."""
        key = self.key("placement")
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    return
                pipe.multi()
                pipe.hset(key, mapping={"epoch": placement.epoch,
                                        "groups": _groups_to_json(groups_of(placement)), "ts": self.clock()})
                pipe.publish(self.epoch_channel, str(placement.epoch))
                pipe.execute()
            except redis.WatchError:
                pass  # someone wrote a placement meanwhile: theirs is newer

    def placement_log(self, n: int = 10) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(self.key("placement", "log"), 0, n - 1)]

    # -- attention replicas: heartbeats and epoch acknowledgements -----------------------------

    def ack_epoch(self, replica_id: str, epoch: int) -> None:
        """The replica adopted `epoch` (at a step boundary); doubles as its heartbeat."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(self.key("replicas", "epoch"), replica_id, epoch)
            pipe.zadd(self.key("replicas", "seen"), {replica_id: self.clock()})
            pipe.execute()

    def heartbeat(self, replica_id: str) -> None:
        self.r.zadd(self.key("replicas", "seen"), {replica_id: self.clock()})

    def live_replicas(self, ttl_s: float) -> dict[str, int]:
        """Replica id -> adopted epoch (-1 if none yet), for replicas seen within `ttl_s`."""
        ids = self.r.zrangebyscore(self.key("replicas", "seen"), self.clock() - ttl_s, "+inf")
        if not ids:
            return {}
        epochs = self.r.hmget(self.key("replicas", "epoch"), ids)
        return {rid: (-1 if e is None else int(e)) for rid, e in zip(ids, epochs)}

    def forget_replica(self, replica_id: str) -> None:
        self.r.hdel(self.key("replicas", "epoch"), replica_id)
        self.r.zrem(self.key("replicas", "seen"), replica_id)
        self.r.hdel(self.key("replicas", "copy"), replica_id)

    def set_copy_endpoint(self, replica_id: str, endpoint: Mapping[str, Any]) -> None:
        """Where a worker copies the replica's in-process ("local") groups from (group_copy.py)."""
        self.r.hset(self.key("replicas", "copy"), replica_id, json.dumps(dict(endpoint)))

    def copy_endpoints(self, ttl_s: float) -> dict[str, dict]:
        """Copy endpoints of the replicas seen within `ttl_s`."""
        live = self.live_replicas(ttl_s)
        if not live:
            return {}
        raw = self.r.hmget(self.key("replicas", "copy"), list(live))
        return {rid: json.loads(v) for rid, v in zip(live, raw) if v}

    # -- inventory ------------------------------------------------------------------------------

    def put_worker(self, rec: WorkerRecord) -> None:
        self.r.hset(self.key("workers"), rec.worker_id, json.dumps(asdict(rec)))

    def workers(self) -> dict[str, WorkerRecord]:
        return {wid: WorkerRecord(**json.loads(v)) for wid, v in self.r.hgetall(self.key("workers")).items()}

    def remove_worker(self, worker_id: str) -> None:
        self.r.hdel(self.key("workers"), worker_id)

    # -- controller state and the operation journal --------------------------------------------

    def begin_operation(self, op: Mapping[str, Any]) -> None:
        """Journal a new operation; refuses if one is already in flight (one at a time)."""
        if not self.r.set(self.key("operation"), json.dumps(op), nx=True):
            raise RuntimeError(f"an operation is already in flight: {self.operation()}")

    def update_operation(self, op: Mapping[str, Any]) -> None:
        self.r.set(self.key("operation"), json.dumps(op))

    def operation(self) -> dict[str, Any] | None:
        text = self.r.get(self.key("operation"))
        return None if text is None else json.loads(text)

    def end_operation(self, op_id: str) -> None:
        """Clear the journal, but only if it still holds `op_id`."""
        key = self.key("operation")
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                text = pipe.get(key)
                if text is None or json.loads(text).get("op_id") != op_id:
                    return
                pipe.multi()
                pipe.delete(key)
                pipe.execute()
            except redis.WatchError:
                pass

    def set_controller(self, **fields: Any) -> None:
        self.r.hset(self.key("controller"), mapping={k: json.dumps(v) for k, v in fields.items()})

    def controller(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.key("controller")).items()}

    def count_operation(self, kind: str, outcome: str) -> None:
        """One more finished placement change (kept with the controller state: a restart keeps counting)."""
        self.r.hincrby(self.key("controller"), f"ops:{kind}:{outcome}", 1)

    def operation_counts(self) -> dict[tuple[str, str], int]:
        """(kind, outcome) -> placement changes finished so far."""
        out = {}
        for field, value in self.r.hgetall(self.key("controller")).items():
            if field.startswith("ops:"):
                _, kind, outcome = field.split(":", 2)
                out[(kind, outcome)] = int(value)
        return out

    # -- metrics windows ------------------------------------------------------------------------

    def _add_sample(self, kind: str, ts: float, payload: dict[str, Any]) -> None:
        key = self.key("metrics", kind)
        payload["n"] = secrets.token_hex(4)  # members of a sorted set must be unique
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {json.dumps(payload): ts})
            pipe.zremrangebyscore(key, "-inf", f"({ts - self.metrics_retention_s}")
            pipe.zremrangebyrank(key, 0, -(self.metrics_max_samples + 1))
            pipe.execute()

    def add_replica_sample(self, s: ReplicaSample) -> None:
        self._add_sample("replica", s.ts, asdict(s))

    def add_worker_sample(self, s: WorkerSample) -> None:
        d = asdict(s)
        d["group_tokens"] = {str(g): n for g, n in s.group_tokens.items()}
        self._add_sample("worker", s.ts, d)

    def window(self, seconds: float, now: float | None = None) -> MetricsWindow:
        end = self.clock() if now is None else now
        start = end - seconds
        rep = self.r.zrangebyscore(self.key("metrics", "replica"), f"({start}", end)
        wrk = self.r.zrangebyscore(self.key("metrics", "worker"), f"({start}", end)
        return MetricsWindow.of(start, end, [_replica(x) for x in rep], [_worker(x) for x in wrk])


def _replica(text: str) -> ReplicaSample:
    d = json.loads(text)
    d.pop("n", None)
    d["ttft_ms"] = tuple(d.get("ttft_ms", ()))
    d["itl_ms"] = tuple(d.get("itl_ms", ()))
    return ReplicaSample(**d)


def _worker(text: str) -> WorkerSample:
    d = json.loads(text)
    d.pop("n", None)
    d["step_ms"] = tuple(d.get("step_ms", ()))
    d["group_tokens"] = {int(g): int(n) for g, n in d.get("group_tokens", {}).items()}
    return WorkerSample(**d)
