"""Replica side of placement epochs: learn of a new epoch by notification, adopt it at a step
boundary, acknowledge it to Redis.

Three places, three threads, so no Redis call ever runs on the engine's step thread:
  listener thread  blocks on the Redis pub/sub channel; on a message (or after (re)subscribing,
                   to catch anything missed) reads the placement, hands it to `prepare` (slow
                   work: connect to new workers, stage it) and parks its epoch as `pending`;
  step thread      the engine's step-boundary hook calls `adopt()`, which makes what `prepare`
                   staged current (invariant 2: between steps, never inside one) - no I/O, a swap;
  ack thread       writes the adopted epoch to Redis right after an adoption, and again every
                   `heartbeat_s` as this replica's heartbeat.
When Redis is down the replica keeps serving on the placement it has (invariant 5); the listener
reconnects with a bounded backoff and catches up by reading the current placement.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import redis

from actors.experts.placement import Placement
from cluster.elastic.store import ElasticStore

log = logging.getLogger(__name__)


class EpochListener:
    def __init__(
        self,
        store: ElasticStore,
        replica_id: str,
        prepare: Callable[[Placement], None],
        adopt: Callable[[], int],
        adopted: Placement | None = None,
        heartbeat_s: float = 2.0,
        poll_timeout_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        """`prepare(placement)` runs on the listener thread: stage the placement (slow work such as
        opening transport connections to new workers is fine there). `adopt()` runs on the step
        thread and must not block: it makes the staged placement current and returns the epoch
        in force, which is what gets acknowledged (a newer one may have been staged meanwhile)."""
        self.store = store
        self.replica_id = replica_id
        self._adopt = adopt
        self._prepare = prepare
        self.heartbeat_s = heartbeat_s
        self.poll_timeout_s = poll_timeout_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._pending: Placement | None = None
        self._adopted_epoch = adopted.epoch if adopted is not None else -1
        self._ack_due = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.redis_errors = 0

    @property
    def epoch(self) -> int:
        return self._adopted_epoch

    def start(self) -> "EpochListener":
        for target, name in ((self._listen, "epoch-listener"), (self._ack_loop, "epoch-ack")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._ack_due.set()  # announce ourselves at once
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._ack_due.set()
        for t in self._threads:
            t.join(timeout_s)

    # -- step thread ----------------------------------------------------------------------------

    def at_step_boundary(self) -> None:
        """Register with AsyncEngine.on_step_boundary. Adopts the newest pending placement."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None or p.epoch <= self._adopted_epoch:
            return
        self._adopted_epoch = self._adopt()
        self._ack_due.set()

    # -- listener thread ------------------------------------------------------------------------

    def offer(self, placement: Placement | None) -> None:
        """Park a placement for the next step boundary if it is newer than what we run."""
        if placement is None or placement.epoch <= self._adopted_epoch:
            return
        with self._lock:
            if self._pending is not None and self._pending.epoch >= placement.epoch:
                return
        self._prepare(placement)
        with self._lock:
            if self._pending is None or self._pending.epoch < placement.epoch:
                self._pending = placement

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.store.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.store.epoch_channel)
                self.offer(self.store.placement())  # anything published while we were away
                backoff = 0.1
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=self.poll_timeout_s)
                    if msg is not None and msg.get("type") == "message":
                        self.offer(self.store.placement())
            except (redis.RedisError, OSError) as e:
                self.redis_errors += 1
                if self.redis_errors == 1 or self.redis_errors % 50 == 0:
                    log.warning("epoch listener: Redis unavailable (%s); serving on epoch %d",
                                e, self._adopted_epoch)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception:  # a bad placement or a prepare failure: keep serving, retry later
                log.exception("epoch listener failed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass

    # -- ack thread -----------------------------------------------------------------------------

    def _ack_loop(self) -> None:
        while not self._stop.is_set():
            self._ack_due.wait(self.heartbeat_s)
            self._ack_due.clear()
            if self._stop.is_set():
                return
            try:
                self.store.ack_epoch(self.replica_id, self._adopted_epoch)
            except (redis.RedisError, OSError):
                self.redis_errors += 1  # retried at the next heartbeat

    def leave(self) -> None:
        """On replica shutdown: stop being waited for."""
        self.stop()
        try:
            self.store.forget_replica(self.replica_id)
        except (redis.RedisError, OSError):
            pass

