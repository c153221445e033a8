"""The end-of-run summary of a locust run, read from `<prefix>_stats.csv`."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EntrySummary:
    kind: str  # POST, GET, TTFT, ITL, or "" for the Aggregated row
    name: str
    count: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    rps: float


@dataclass(frozen=True)
class RunSummary:
    entries: list[EntrySummary]

    @property
    def requests(self) -> list[EntrySummary]:
        """HTTP requests only; TTFT/ITL entries are latency samples."""
        return [e for e in self.entries if e.kind in ("GET", "POST")]

    @property
    def request_count(self) -> int:
        return sum(e.count for e in self.requests)

    @property
    def failure_count(self) -> int:
        return sum(e.failures for e in self.requests)

    def entry(self, kind: str, name: str | None = None) -> EntrySummary | None:
        return next((e for e in self.entries if e.kind == kind and (name is None or e.name == name)), None)

    def markdown(self) -> str:
        rows = ["| entry | name | count | failures | p50 (ms) | p99 (ms) | per second |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for e in self.entries:
            if e.name == "Aggregated":
                continue
            rows.append(
                f"| {e.kind} | `{e.name}` | {e.count} | {e.failures} | {_ms(e.p50_ms)} | {_ms(e.p99_ms)} | {e.rps:.2f} |"
            )
        rows.append(f"\n{self.request_count} requests, {self.failure_count} failed.")
        return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # locust writes N/A for entries without samples


def read_summary(stats_csv: Path) -> RunSummary:
    with stats_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    entries = [
        EntrySummary(
            kind=row["Type"] or "",
            name=row["Name"],
            count=int(row["Request Count"]),
            failures=int(row["Failure Count"]),
            p50_ms=_number(row["50%"]),
            p99_ms=_number(row["99%"]),
            rps=_number(row["Requests/s"]) or 0.0,
        )
        for row in rows
    ]
    return RunSummary(entries)
