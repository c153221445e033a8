"""The one bound of the tests that probe /health under load (slow clients, grammar compiles): the
median under 100 ms, the p99 under HEALTH_P99_S. The 2-core CI machine is shared, so the p99 bound
is looser than the issue's 100 ms; docs/reliability.md has the measured p99."""

from __future__ import annotations

import os

HEALTH_P99_S = float(os.environ.get("MOGE_HEALTH_P99_S", "0.5"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p99(values: list[float]) -> float:
    return pct(values, 0.99)


def fast(health: list[float]) -> bool:
    """Were these /health latencies (seconds) answered beside the work, not queued behind it?"""
    return pct(health, 0.5) < 0.1 and p99(health) < HEALTH_P99_S
