"""Policy simulator: replay a traffic trace (rps over time) through a toy capacity model and a
guarded policy, tick by tick on a simulated clock, and plot devices and latency over time.

The capacity model is deliberately simple (one number per device, M/M/1-like latency growth,
a backlog when demand exceeds capacity, a fixed delay before a new device serves); it is for
comparing policies and tuning their knobs, not for predicting absolute latencies.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cluster.elastic.metrics_window import MetricsWindow, ReplicaSample, WorkerSample
from cluster.elastic.policy.policies import ScalingContext
from cluster.elastic.policy.guarded import GuardedPolicy

Trace = list[tuple[float, float]]  # (seconds from start, requests per second), sorted by time


@dataclass(frozen=True)
class CapacityModel:
    rps_per_device: float = 2.0  # requests/s one device sustains at 100 % utilisation
    base_ttft_ms: float = 300.0  # TTFT of an idle cluster
    base_itl_ms: float = 40.0  # inter-token latency of an idle cluster
    scale_up_delay_s: float = 15.0  # decision -> the new device serves
    n_groups: int = 8
    start_devices: int = 1


@dataclass(frozen=True)
class SimStep:
    t: float
    rps: float
    devices: int
    utilisation: float
    backlog: float  # requests waiting
    ttft_p99_ms: float
    itl_p99_ms: float
    decision: int
    reason: str


class SimClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def load_trace(path: str | Path) -> Trace:
    """CSV with columns t,rps (header optional)."""
    out: Trace = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                out.append((float(row[0]), float(row[1])))
            except ValueError:
                continue  # header
    if not out:
        raise ValueError(f"{path}: no (t, rps) rows")
    return sorted(out)


def shape_trace(shape: str, duration_s: float = 1800, peak_rps: float = 10.0) -> Trace:
    """Built-in traffic shapes: step, ramp, spike, diurnal (one 'day' over the duration)."""
    n = 60
    ts = [duration_s * i / n for i in range(n + 1)]
    if shape == "step":
        return [(t, peak_rps if duration_s / 4 <= t < 3 * duration_s / 4 else peak_rps / 5) for t in ts]
    if shape == "ramp":
        return [(t, peak_rps * min(1.0, t / (duration_s / 2)) if t < 3 * duration_s / 4 else peak_rps / 5)
                for t in ts]
    if shape == "spike":
        return [(t, peak_rps if abs(t - duration_s / 2) < duration_s / 20 else peak_rps / 6) for t in ts]
    if shape == "diurnal":
        return [(t, peak_rps * (0.55 - 0.45 * math.cos(2 * math.pi * t / duration_s))) for t in ts]
    raise ValueError(f"unknown shape {shape!r}: step, ramp, spike or diurnal")


def rps_at(trace: Trace, t: float) -> float:
    """Linear interpolation between trace points; flat beyond the ends."""
    if t <= trace[0][0]:
        return trace[0][1]
    for (t0, r0), (t1, r1) in zip(trace, trace[1:]):
        if t0 <= t <= t1:
            return r0 if t1 == t0 else r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return trace[-1][1]


@dataclass
class _Cluster:
    devices: int
    backlog: float = 0.0
    arriving: list[tuple[float, int]] = field(default_factory=list)  # (ready at, devices)


def simulate(trace: Trace, policy: GuardedPolicy, clock: SimClock, model: CapacityModel = CapacityModel(),
             tick_s: float = 5.0, window_s: float = 30.0, seed: int = 0) -> list[SimStep]:
    """Tick from the trace's start to its end. `clock` must be the clock `policy` reads."""
    rng = random.Random(seed)
    start, end = trace[0][0], trace[-1][0]
    cl = _Cluster(model.start_devices)
    replica_samples: list[ReplicaSample] = []
    worker_samples: list[WorkerSample] = []
    steps: list[SimStep] = []
    t = start
    while t <= end + 1e-9:
        clock.t = t
        for ready_at, n in [a for a in cl.arriving if a[0] <= t]:
            cl.devices = n
            cl.arriving.remove((ready_at, n))
            policy.record_change(ready_at)  # cooldown from when the change took effect

        rps = rps_at(trace, t)
        capacity = cl.devices * model.rps_per_device
        cl.backlog = max(0.0, cl.backlog + (rps - capacity) * tick_s)
        rho = rps / capacity
        util = 1.0 if cl.backlog > 0 else min(1.0, rho)
        wait_ms = 1000.0 * cl.backlog / capacity
        congestion = 1.0 / (1.0 - min(rho, 0.95))
        ttft = model.base_ttft_ms * congestion + wait_ms
        itl = model.base_itl_ms * math.sqrt(congestion)
        noise = [rng.uniform(0.8, 1.2) for _ in range(20)]
        replica_samples.append(ReplicaSample("sim", t, queue=int(cl.backlog), running=int(min(rps, capacity)),
                                             ttft_ms=tuple(ttft * x for x in noise),
                                             itl_ms=tuple(itl * x for x in noise)))
        worker_samples.extend(WorkerSample(f"d{i}", t, tick_s, tokens=int(rps * tick_s), busy_s=util * tick_s)
                              for i in range(cl.devices))
        window = MetricsWindow.of(t - window_s, t, replica_samples, worker_samples)
        replica_samples = list(window.replicas)
        worker_samples = list(window.workers)

        ctx = ScalingContext(t, window, cl.devices, model.n_groups)
        d = policy.decide(ctx)
        if d.devices != cl.devices and not cl.arriving:
            if d.devices > cl.devices:
                cl.arriving.append((t + model.scale_up_delay_s, d.devices))
            else:
                cl.devices = d.devices  # draining is fast next to loading
                policy.record_change()
        steps.append(SimStep(t, rps, cl.devices, util, cl.backlog, window.ttft_p(99) or 0.0,
                             window.itl_p(99) or 0.0, d.devices, d.reason))
        t += tick_s
    return steps


def summary(steps: Sequence[SimStep], ttft_target_ms: float | None = None) -> dict[str, float]:
    """Device-seconds used, peak devices, share of ticks missing the TTFT target."""
    tick = steps[1].t - steps[0].t if len(steps) > 1 else 1.0
    out = {
        "device_seconds": sum(s.devices for s in steps) * tick,
        "peak_devices": float(max(s.devices for s in steps)),
        "max_ttft_p99_ms": max(s.ttft_p99_ms for s in steps),
        "scaling_actions": float(sum(1 for a, b in zip(steps, steps[1:]) if a.devices != b.devices)),
    }
    if ttft_target_ms is not None:
        out["ttft_miss_share"] = sum(1 for s in steps if s.ttft_p99_ms > ttft_target_ms) / len(steps)
    return out


def plot(steps: Sequence[SimStep], path: str | Path, title: str = "policy simulation",
         ttft_target_ms: float | None = None, itl_target_ms: float | None = None,
         rps_per_device: float | None = None) -> Path:
    """PNG: traffic and capacity, devices, and p99 latencies over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in steps]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax1.plot(t, [s.rps for s in steps], label="offered rps")
    if rps_per_device:
        ax1.plot(t, [s.devices * rps_per_device for s in steps], "--", label="capacity rps")
    ax1.set_ylabel("requests/s")
    ax1.legend(loc="upper right")
    ax2.step(t, [s.devices for s in steps], where="post", color="tab:green", label="devices")
    ax2.set_ylabel("devices")
    ax2.legend(loc="upper right")
    ax3.plot(t, [s.ttft_p99_ms for s in steps], label="TTFT p99")
    ax3.plot(t, [s.itl_p99_ms for s in steps], label="ITL p99")
    if ttft_target_ms:
        ax3.axhline(ttft_target_ms, color="tab:blue", linestyle=":", label="TTFT target")
    if itl_target_ms:
        ax3.axhline(itl_target_ms, color="tab:orange", linestyle=":", label="ITL target")
    ax3.set_yscale("log")
    ax3.set_ylabel("ms")
    ax3.set_xlabel("minutes")
    ax3.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
