"""Samples the server's expert device count during a load test, for the plot.

Sources, first that answers: `/admin/status` JSON "devices" (a number, or a list of devices),
then the `moge_devices` gauge of `/metrics`; when neither exists the count is taken as 1 (the
embedded default runs every group on one device) and the samples say so.
"""

from __future__ import annotations

import csv
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GAUGE = re.compile(r"^moge_devices(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


def devices_from_status(body: object) -> int | None:
    if not isinstance(body, dict) or "devices" not in body:
        return None
    devices = body["devices"]
    if isinstance(devices, bool):
        return None
    if isinstance(devices, (int, float)):
        return int(devices)
    if isinstance(devices, (list, dict)):
        return len(devices)
    return None


def devices_from_metrics(text: str) -> int | None:
    """The moge_devices gauge; with several label sets (one per replica) the largest, since each
    reports the same cluster-wide count and a lagging one is merely stale."""
    values = [float(v) for v in GAUGE.findall(text)]
    return int(round(max(values))) if values else None


@dataclass
class DevicePoller:
    base_url: str
    interval_s: float = 1.0
    api_key: str | None = None
    samples: list[tuple[float, int, str]] = field(default_factory=list)  # (unix time, devices, source)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self, client: httpx.Client) -> tuple[int, str]:
        try:
            resp = client.get("/admin/status")
            if resp.status_code == 200:
                count = devices_from_status(resp.json())
                if count is not None:
                    return count, "admin/status"
        except (httpx.HTTPError, ValueError):
            pass
        try:
            resp = client.get("/metrics")
            if resp.status_code == 200:
                count = devices_from_metrics(resp.text)
                if count is not None:
                    return count, "metrics"
        except httpx.HTTPError:
            pass
        return 1, "assumed"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="device-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(base_url=self.base_url, timeout=min(5.0, self.interval_s * 4), headers=headers) as client:
            while not self._stop.is_set():
                count, source = self.sample(client)
                self.samples.append((time.time(), count, source))
                self._stop.wait(self.interval_s)

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Timestamp", "Devices", "Source"])
            writer.writerows((f"{t:.3f}", n, s) for t, n, s in self.samples)
