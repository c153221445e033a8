"""Traffic curves: how many simulated users are active t seconds into a load test.

Pure functions of time with no locust import, so they can be tested (and plotted) anywhere;
loadtest/shapes.py wraps them into locust LoadTestShape classes. Every curve ends: `users_at`
returns None once t passes the duration, which stops the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Protocol


class TrafficCurve(Protocol):
    duration_s: float

    def users_at(self, t: float) -> int | None: ...

    def spawn_rate(self) -> float: ...


@dataclass(frozen=True)
class Constant:
    users: int
    duration_s: float

    def users_at(self, t: float) -> int | None:
        return None if t >= self.duration_s else self.users

    def spawn_rate(self) -> float:
        return float(self.users)


@dataclass(frozen=True)
class Step:
    """Equal stairs from peak/steps up to peak: where does latency start to climb?"""

    peak_users: int
    duration_s: float
    steps: int = 4

    def users_at(self, t: float) -> int | None:
        if t >= self.duration_s:
            return None
        stair = min(self.steps - 1, int(t / (self.duration_s / self.steps)))
        return max(1, round(self.peak_users * (stair + 1) / self.steps))

    def spawn_rate(self) -> float:
        return float(self.peak_users)  # each stair is reached at once


@dataclass(frozen=True)
class Spike:
    """A base load with one burst to peak in the middle fifth: does the system absorb a surge?"""

    peak_users: int
    duration_s: float
    base_fraction: float = 0.2

    def users_at(self, t: float) -> int | None:
        if t >= self.duration_s:
            return None
        base = max(1, round(self.peak_users * self.base_fraction))
        in_spike = 0.4 * self.duration_s <= t < 0.6 * self.duration_s
        return self.peak_users if in_spike else base

    def spawn_rate(self) -> float:
        return float(self.peak_users)


@dataclass(frozen=True)
class Ramp:
    """Linear growth from 1 user to peak over the whole run."""

    peak_users: int
    duration_s: float

    def users_at(self, t: float) -> int | None:
        if t >= self.duration_s:
            return None
        return max(1, round(1 + (self.peak_users - 1) * t / self.duration_s))

    def spawn_rate(self) -> float:
        return max(1.0, self.peak_users / max(self.duration_s, 1e-9) * 2)


@dataclass(frozen=True)
class Diurnal:
    """One day of traffic compressed into the run: a trough at the start and end, a peak at noon
    (a raised cosine between trough_fraction·peak and peak)."""

    peak_users: int
    duration_s: float
    trough_fraction: float = 0.1

    def users_at(self, t: float) -> int | None:
        if t >= self.duration_s:
            return None
        day = t / self.duration_s  # 0 = midnight, 0.5 = noon
        level = self.trough_fraction + (1 - self.trough_fraction) * (1 - math.cos(2 * math.pi * day)) / 2
        return max(1, round(self.peak_users * level))

    def spawn_rate(self) -> float:
        return max(1.0, self.peak_users / max(self.duration_s, 1e-9) * 8)


CURVES = {"constant": Constant, "step": Step, "spike": Spike, "ramp": Ramp, "diurnal": Diurnal}

# The runner passes the curve to the locust process through these variables.
ENV_SHAPE = "MOGE_LOADTEST_SHAPE"
ENV_USERS = "MOGE_LOADTEST_USERS"
ENV_DURATION = "MOGE_LOADTEST_DURATION_S"


def make_curve(name: str, users: int, duration_s: float) -> TrafficCurve:
    if name not in CURVES:
        raise ValueError(f"unknown traffic shape {name!r}; choose one of {', '.join(CURVES)}")
    if users < 1 or duration_s <= 0:
        raise ValueError(f"need users >= 1 and duration > 0, got {users} users for {duration_s} s")
    cls = CURVES[name]
    return cls(users, duration_s)  # type: ignore[arg-type]


def curve_from_env(env: Mapping[str, str] | None = None) -> TrafficCurve | None:
    env = os.environ if env is None else env
    name = env.get(ENV_SHAPE)
    if not name:
        return None
    return make_curve(name, int(env.get(ENV_USERS, "4")), float(env.get(ENV_DURATION, "30")))
