"""Live migration of expert groups as a state machine, kept apart from the controller actor.

One operation takes the placement from epoch e (old groups -> holders) to a new map (a move, a
replication, a drain, a scale-up: all are "old map -> new map"). The protocol
(docs/architecture.md, "Migration protocol"):

  PLANNED -> LOADING: every worker that gains a group loads it (peer-to-peer from a current holder,
             or from the checkpoint) and warms up
          -> PUBLISHING: epoch e+1 is written (compare-and-set on e) and announced
          -> PUBLISHED: wait until every live attention replica acknowledged e+1 (they switch only
             between steps, invariant 2)
          -> DROPPING (entered once every live replica acknowledged): old holders drop what they
             lost; retired workers are stopped
          -> DONE
Any failure before DROPPING rolls back (invariant 3): before publication nothing changed for
replicas, so the new copies are dropped and epoch e stays; after publication the old map is
published again as a newer epoch and, once acknowledged, the new copies are dropped. Old holders
are never touched before DROPPING, so every replica can always reach every group it may still use.

Every phase change is journaled (ports.journal) before the next side effect, so a restarted
controller calls `resume(op)` and either finishes or rolls back.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Mapping, Protocol, Sequence

from actors.experts.placement import Groups

log = logging.getLogger(__name__)


class Phase(str, Enum):
    PLANNED = "planned"
    LOADING = "loading"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    DROPPING = "dropping"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


TERMINAL = (Phase.DONE, Phase.ROLLED_BACK)


class MigrationPorts(Protocol):
    """What the state machine needs from the world; the controller wires Ray + Redis, tests fakes."""

    def load(self, worker: str, groups: list[int], peers: dict[int, str | None]) -> None:
        """Load `groups` onto `worker` (from the peer holding each, None = checkpoint) and warm up."""

    def drop(self, worker: str, groups: list[int]) -> None: ...

    def publish(self, groups: Groups, expected_epoch: int) -> int:
        """Compare-and-set expected_epoch -> expected_epoch + 1; returns the new epoch."""

    def current(self) -> tuple[int, Groups]:
        """The stored epoch and map (to settle a publish whose reply was lost)."""

    def wait_acks(self, epoch: int, timeout_s: float) -> bool:
        """True once every live attention replica runs `epoch` or newer."""

    def stop_worker(self, worker: str) -> None: ...

    def journal(self, op: "Operation") -> None: ...


@dataclass
class Operation:
    kind: str  # migrate | scale | rebalance | repair
    from_epoch: int
    old_groups: Groups
    new_groups: Groups
    added_workers: list[str] = field(default_factory=list)  # started for this op; stopped on rollback
    retired_workers: list[str] = field(default_factory=list)  # stopped once the op is done
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: Phase = Phase.PLANNED
    new_epoch: int | None = None
    rollback_epoch: int | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    detail: dict = field(default_factory=dict)

    # -- what the maps imply --------------------------------------------------------------------

    def gains(self) -> dict[str, list[int]]:
        """Worker -> groups it holds in the new map but not in the old one."""
        return _diff(self.new_groups, self.old_groups)

    def losses(self) -> dict[str, list[int]]:
        """Worker -> groups it held in the old map but not in the new one."""
        return _diff(self.old_groups, self.new_groups)

    def peers_for(self, worker: str, groups: Sequence[int], alive: set[str] | None = None) -> dict[int, str | None]:
        """A current holder to copy each group from (first old holder that is not `worker`)."""
        out: dict[int, str | None] = {}
        for g in groups:
            holders = [h for h in self.old_groups.get(g, ()) if h != worker and (alive is None or h in alive)]
            out[g] = holders[0] if holders else None
        return out

    # -- journal form ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phase"] = self.phase.value
        d["old_groups"] = {str(g): list(ws) for g, ws in self.old_groups.items()}
        d["new_groups"] = {str(g): list(ws) for g, ws in self.new_groups.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Operation":
        d = dict(d)
        d["phase"] = Phase(d["phase"])
        d["old_groups"] = {int(g): tuple(ws) for g, ws in d["old_groups"].items()}
        d["new_groups"] = {int(g): tuple(ws) for g, ws in d["new_groups"].items()}
        return cls(**d)


def _diff(a: Groups, b: Groups) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g, holders in a.items():
        for w in holders:
            if w not in b.get(g, ()):
                out.setdefault(w, []).append(g)
    return {w: sorted(gs) for w, gs in out.items()}


def validate_map(groups: Groups, n_groups: int) -> None:
    """Every group has at least one holder and no unknown group appears."""
    missing = [g for g in range(n_groups) if not groups.get(g)]
    extra = [g for g in groups if not 0 <= g < n_groups]
    if missing or extra:
        raise ValueError(f"placement must cover groups 0..{n_groups - 1}: missing {missing}, unknown {extra}")


class MigrationRunner:
    def __init__(self, ports: MigrationPorts, ack_timeout_s: float = 60.0) -> None:
        self.ports = ports
        self.ack_timeout_s = ack_timeout_s

    def _enter(self, op: Operation, phase: Phase) -> None:
        op.phase = phase
        self.ports.journal(op)

    def run(self, op: Operation) -> Operation:
        """Drive a freshly planned operation to DONE or ROLLED_BACK. Step failures roll back; an
        exception escapes only if the rollback itself cannot proceed (Redis down): the journal
        then holds ROLLING_BACK and a later `resume` finishes it."""
        self.ports.journal(op)
        try:
            self._load(op)
        except Exception as e:
            log.warning("operation %s: loading failed: %s", op.op_id, e)
            return self._roll_back(op, f"{type(e).__name__}: {e}")
        return self._continue(op)

    def resume(self, op: Operation) -> Operation:
        """Continue a journaled operation after a controller restart."""
        if op.phase in TERMINAL:
            return op
        if op.phase in (Phase.PLANNED, Phase.LOADING):
            # What the workers hold is unknown mid-load and nothing was published: roll back.
            return self._roll_back(op, op.error or "controller restarted before publication")
        return self._continue(op)

    def _continue(self, op: Operation) -> Operation:
        try:
            if op.phase == Phase.PUBLISHING:
                self._publish(op)
            if op.phase == Phase.PUBLISHED:
                if not self.ports.wait_acks(op.new_epoch, self.ack_timeout_s):
                    raise TimeoutError(f"attention replicas did not acknowledge epoch {op.new_epoch} "
                                       f"within {self.ack_timeout_s}s")
                self._enter(op, Phase.DROPPING)
            if op.phase == Phase.DROPPING:
                self._drop_old(op)
                self._enter(op, Phase.DONE)
                return op
        except Exception as e:
            log.warning("operation %s failed in phase %s: %s", op.op_id, op.phase.value, e)
            return self._roll_back(op, f"{type(e).__name__}: {e}")
        if op.phase == Phase.ROLLING_BACK:
            return self._roll_back(op, op.error or "resumed rollback")
        return op

    def _load(self, op: Operation) -> None:
        self._enter(op, Phase.LOADING)
        for worker, groups in op.gains().items():
            self.ports.load(worker, groups, op.peers_for(worker, groups))
        self._enter(op, Phase.PUBLISHING)

    def _publish(self, op: Operation) -> None:
        op.detail["publish_attempted"] = True
        self.ports.journal(op)
        try:
            op.new_epoch = self.ports.publish(op.new_groups, op.from_epoch)
        except Exception:
            if not self._settle_publish(op):
                raise
        self._enter(op, Phase.PUBLISHED)

    def _settle_publish(self, op: Operation) -> bool:
        """Did our publication land (reply lost)? Asks the store; raises if it cannot be reached."""
        epoch, groups = self.ports.current()
        if epoch == op.from_epoch + 1 and groups == op.new_groups:
            op.new_epoch = epoch
            return True
        return False

    def _drop_old(self, op: Operation) -> None:
        for worker, groups in op.losses().items():
            if worker in op.retired_workers:
                continue  # it is stopped below; dropping first would only cost time
            try:
                self.ports.drop(worker, groups)
            except Exception as e:  # no replica routes to it any more: a failed drop only leaks memory
                log.warning("drop of %s on %s failed: %s", groups, worker, e)
        for worker in op.retired_workers:
            try:
                self.ports.stop_worker(worker)
            except Exception as e:
                log.warning("stopping %s failed: %s", worker, e)

    def _roll_back(self, op: Operation, why: str) -> Operation:
        op.error = op.error or why
        self._enter(op, Phase.ROLLING_BACK)
        if op.new_epoch is None and op.detail.get("publish_attempted"):
            self._settle_publish(op)  # never drop copies replicas might have been told to use
        if op.new_epoch is not None and op.rollback_epoch is None:
            # Replicas may already route to the new copies: put the old map back as a newer epoch
            # and wait for it before the new copies go away.
            epoch, _ = self.ports.current()
            op.rollback_epoch = self.ports.publish(op.old_groups, epoch)
            self.ports.journal(op)
        if op.rollback_epoch is not None and not self.ports.wait_acks(op.rollback_epoch, self.ack_timeout_s):
            # Keep the new copies (harmless extra memory) rather than risk a replica still using them.
            log.warning("rollback epoch %s not acknowledged; leaving new copies in place", op.rollback_epoch)
            self._enter(op, Phase.ROLLED_BACK)
            return op
        for worker, groups in op.gains().items():
            if worker in op.added_workers:
                continue
            try:
                self.ports.drop(worker, groups)
            except Exception as e:  # the target may be the thing that failed
                log.info("rollback drop of %s on %s: %s", groups, worker, e)
        for worker in op.added_workers:
            try:
                self.ports.stop_worker(worker)
            except Exception as e:
                log.info("rollback stop of %s: %s", worker, e)
        self._enter(op, Phase.ROLLED_BACK)
        return op
