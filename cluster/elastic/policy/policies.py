"""Autoscaling policies: pure functions from a scaling context to a decision.

A policy only says how many devices it would like and how loaded the cluster is relative to its
target (`load`: 1.0 = exactly at target). Bounds, cooldown and hysteresis are applied once, by
cluster/elastic/policy/guarded.py, so every policy gets the same guard rails and the same tests.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from cluster.elastic.metrics_window import MetricsWindow


@dataclass(frozen=True)
class ScalingContext:
    now: float  # seconds since the epoch, from the injected clock
    window: MetricsWindow
    devices: int  # devices (expert workers) serving now
    n_groups: int
    placement: Mapping[int, Sequence[str]] = field(default_factory=dict)  # group -> workers
    inventory: Mapping[str, str] = field(default_factory=dict)  # worker id -> state


@dataclass(frozen=True)
class Decision:
    devices: int  # desired number of devices
    reason: str
    load: float | None = None  # observed / target; None = no load signal (no hysteresis applies)


Policy = Callable[[ScalingContext], Decision]


def hold(ctx: ScalingContext, reason: str) -> Decision:
    return Decision(ctx.devices, reason)


@dataclass(frozen=True)
class UtilisationPolicy:
    """Keep mean worker busy-fraction near `target_utilisation` and queued requests per device
    under `target_queue_per_device`; the more demanding of the two wins."""

    target_utilisation: float = 0.6
    target_queue_per_device: float = 4.0

    def __call__(self, ctx: ScalingContext) -> Decision:
        util = ctx.window.mean_utilisation()
        if util is None:
            return hold(ctx, "no worker metrics in the window")
        util_load = util / self.target_utilisation
        queue = ctx.window.queue()
        queue_load = (queue / (self.target_queue_per_device * ctx.devices)
                      if self.target_queue_per_device > 0 else 0.0)
        load = max(util_load, queue_load)
        devices = max(1, math.ceil(ctx.devices * load - 1e-9))
        return Decision(devices, f"utilisation {util:.2f} (target {self.target_utilisation}), "
                                 f"queue {queue:.0f} (target {self.target_queue_per_device}/device)", load)


@dataclass(frozen=True)
class SloPolicy:
    """Add devices when TTFT or inter-token p99 misses its target (up to doubling for a large miss);
    remove one when the latency projected for one device fewer still meets both targets (the
    wrapper's hysteresis decides by how much), or when the replicas report no work at all (no
    latency samples, nothing queued or running) and the workers would not be overloaded on one
    fewer. TTFT is measured from each request's arrival (invariant 8), so queueing counts."""

    ttft_p99_ms: float = 2000.0
    itl_p99_ms: float = 200.0

    def __call__(self, ctx: ScalingContext) -> Decision:
        ttft = ctx.window.ttft_p(99)
        itl = ctx.window.itl_p(99)
        if ttft is None and itl is None:
            d, w = ctx.devices, ctx.window
            idle = bool(w.replicas) and w.queue() == 0 and w.running() == 0
            if idle and d > 1 and math.isfinite(_fewer_devices_factor(d, w.mean_utilisation())):
                return Decision(d - 1, "idle: no requests queued, running or answered in the window", 0.0)
            return hold(ctx, "no latency samples in the window")
        ratios = []
        if ttft is not None:
            ratios.append(ttft / self.ttft_p99_ms)
        if itl is not None:
            ratios.append(itl / self.itl_p99_ms)
        load = max(ratios)
        desc = f"ttft p99 {ttft or 0:.0f} ms / {self.ttft_p99_ms:.0f}, itl p99 {itl or 0:.0f} ms / {self.itl_p99_ms:.0f}"
        d = ctx.devices
        if load > 1.0:
            return Decision(max(d + 1, math.ceil(d * min(load, 2.0))), "SLO missed: " + desc, load)
        if d > 1:
            projected = load * _fewer_devices_factor(d, ctx.window.mean_utilisation())
            if projected < 1.0:
                return Decision(d - 1, f"SLO met with margin (projected {projected:.2f} on {d - 1}): " + desc,
                                projected)
        return Decision(d, "SLO met: " + desc, load)


def _fewer_devices_factor(devices: int, utilisation: float | None) -> float:
    """How much latency grows if the same work runs on one device fewer.

    Latency of a loaded server grows like 1 / (1 - utilisation); without a utilisation signal assume
    latency scales with the work per device, devices / (devices - 1)."""
    share = devices / (devices - 1)
    if utilisation is None:
        return share
    after = utilisation * share
    if after >= 0.95:
        return math.inf
    return (1.0 - min(utilisation, 0.95)) / (1.0 - after)


@dataclass(frozen=True)
class ScheduleEntry:
    minute_of_day: int  # UTC
    devices: int


def parse_schedule(entries: Sequence[Mapping[str, Any]]) -> tuple[ScheduleEntry, ...]:
    """[{at: "HH:MM", devices: N}, ...] -> entries sorted by time; ValueError on bad input."""
    out = []
    for e in entries:
        try:
            hh, mm = str(e["at"]).split(":")
            minute = int(hh) * 60 + int(mm)
            devices = int(e["devices"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"schedule entry {dict(e)!r}: expected {{at: 'HH:MM', devices: N}}") from err
        if not 0 <= minute < 24 * 60 or devices < 1:
            raise ValueError(f"schedule entry {dict(e)!r}: time must be 00:00-23:59 and devices >= 1")
        out.append(ScheduleEntry(minute, devices))
    return tuple(sorted(out, key=lambda s: s.minute_of_day))


@dataclass(frozen=True)
class SchedulePolicy:
    """Devices by time of day (UTC): the latest entry at or before now; before the first entry of
    the day, yesterday's last one still holds."""

    entries: tuple[ScheduleEntry, ...]

    def __call__(self, ctx: ScalingContext) -> Decision:
        if not self.entries:
            return hold(ctx, "empty schedule")
        t = dt.datetime.fromtimestamp(ctx.now, dt.timezone.utc)
        minute = t.hour * 60 + t.minute
        current = self.entries[-1]
        for e in self.entries:
            if e.minute_of_day <= minute:
                current = e
        hhmm = f"{current.minute_of_day // 60:02d}:{current.minute_of_day % 60:02d}"
        return Decision(current.devices, f"schedule entry {hhmm} UTC")


@dataclass(frozen=True)
class NoPolicy:
    """Manual scaling only (admin API / CLI)."""

    def __call__(self, ctx: ScalingContext) -> Decision:
        return hold(ctx, "no autoscaling policy")


def make_policy(section: Any) -> Policy:
    """Build the policy named in a PolicySection (cluster/config.py)."""
    if section.name == "utilisation":
        return UtilisationPolicy(section.target_utilisation, section.target_queue_per_device)
    if section.name == "slo":
        return SloPolicy(section.ttft_p99_ms, section.itl_p99_ms)
    if section.name == "schedule":
        return SchedulePolicy(parse_schedule(section.schedule))
    if section.name == "none":
        return NoPolicy()
    raise ValueError(f"unknown policy {section.name!r}")
