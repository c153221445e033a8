"""The one place where bounds, cooldown and hysteresis are applied to any policy's decision.

Rules, in order:
1. bounds: a cluster outside [min_devices, max_devices] is brought inside at once (cooldown does
   not apply: e.g. cold start with 0 devices, or an operator lowered max_devices);
2. cold start: an empty metrics window means "no evidence", so hold (a schedule policy, which needs
   no metrics, is still followed);
3. the policy's wish is clamped to the bounds; equal to now -> hold;
4. cooldown: no change within `cooldown_s` of the last one (either direction);
5. hysteresis: scale up whenever the policy asks (latency first), but scale down only when the
   policy's load is below 1 - hysteresis, so a cluster sitting near its target does not flap.
Time comes from the context (`ctx.now`, stamped by the controller's one clock), so a decision is
a function of what it is given; the injected clock only stamps `record_change()` called without a
time, and tests drive it by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from cluster.elastic.policy.policies import Decision, Policy, ScalingContext


@dataclass
class GuardedPolicy:
    policy: Policy
    min_devices: int = 1
    max_devices: int = 8
    cooldown_s: float = 30.0
    hysteresis: float = 0.2
    clock: Callable[[], float] = field(default=time.time)
    needs_metrics: bool = True  # False for policies that read no metrics (schedule)
    last_change_at: float | None = None

    def __post_init__(self) -> None:
        if self.min_devices < 1 or self.min_devices > self.max_devices:
            raise ValueError(f"bounds [{self.min_devices}, {self.max_devices}] are not a valid range")
        if not 0 <= self.hysteresis < 1:
            raise ValueError("hysteresis must be in [0, 1)")

    def decide(self, ctx: ScalingContext) -> Decision:
        cur = ctx.devices
        if cur < self.min_devices:
            return Decision(self.min_devices, f"below min_devices={self.min_devices}")
        if cur > self.max_devices:
            return Decision(self.max_devices, f"above max_devices={self.max_devices}")
        if self.needs_metrics and ctx.window.empty:
            return Decision(cur, "cold start: no metrics yet")

        wish = self.policy(ctx)
        want = min(max(wish.devices, self.min_devices), self.max_devices)
        if want == cur:
            return Decision(cur, wish.reason, wish.load)

        now = ctx.now
        if self.last_change_at is not None and now - self.last_change_at < self.cooldown_s:
            left = self.cooldown_s - (now - self.last_change_at)
            return Decision(cur, f"cooldown ({left:.0f}s left): {wish.reason}", wish.load)
        if want < cur and wish.load is not None and wish.load >= 1.0 - self.hysteresis:
            return Decision(cur, f"within hysteresis (load {wish.load:.2f}): {wish.reason}", wish.load)
        return Decision(want, wish.reason, wish.load)

    def record_change(self, at: float | None = None) -> None:
        """The controller acted on a decision: start the cooldown."""
        self.last_change_at = self.clock() if at is None else at


def guarded_from_config(section, policy: Policy, clock: Callable[[], float] = time.time) -> GuardedPolicy:
    """GuardedPolicy with the bounds and guards of a PolicySection (cluster/config.py)."""
    return GuardedPolicy(
        policy,
        min_devices=section.min_devices,
        max_devices=section.max_devices,
        cooldown_s=section.cooldown_s,
        hysteresis=section.hysteresis,
        clock=clock,
        needs_metrics=section.name not in ("schedule", "none"),
    )
