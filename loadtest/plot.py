"""One PNG of a load test run: throughput, latency percentiles and device count over time.

Input: locust's `<prefix>_stats_history.csv` (written with --csv-full-history, so each entry has
rows with its own windowed percentiles) and the device poller's CSV.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

LATENCY_COLUMNS = {"50%": "p50", "99%": "p99"}


def load_history(path: Path) -> pd.DataFrame:
    history = pd.read_csv(path)
    for col in ["Requests/s", "Failures/s", *LATENCY_COLUMNS]:
        history[col] = pd.to_numeric(history[col], errors="coerce")  # "N/A" before the first request
    for col in LATENCY_COLUMNS:
        # locust writes 0 for a window without samples; that is "no data", not a 0 ms latency.
        history.loc[history[col] <= 0, col] = float("nan")
    history["Type"] = history["Type"].fillna("")
    history["Name"] = history["Name"].fillna("")
    return history


def throughput(history: pd.DataFrame) -> pd.DataFrame:
    """Completed and failed generation requests per second (the TTFT/ITL entries are samples, not requests)."""
    requests = history[(history["Type"] == "POST")]
    return requests.groupby("Timestamp")[["Requests/s", "Failures/s"]].sum()


def entry_percentiles(history: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = history[history["Type"] == kind].set_index("Timestamp")
    return rows[list(LATENCY_COLUMNS)].rename(columns=LATENCY_COLUMNS)


def request_percentiles(history: pd.DataFrame) -> pd.DataFrame:
    """Per timestamp, the slower non-streamed route's p50 and p99 (streams have TTFT and ITL)."""
    requests = history[(history["Type"] == "POST") & ~history["Name"].str.endswith("[stream]")]
    return requests.groupby("Timestamp")[list(LATENCY_COLUMNS)].max().rename(columns=LATENCY_COLUMNS)


def plot_run(history_csv: Path, devices_csv: Path | None, out_png: Path, title: str) -> Path:
    history = load_history(history_csv)
    t0 = history["Timestamp"].min()
    devices = pd.read_csv(devices_csv) if devices_csv and devices_csv.exists() else None

    fig, (ax_rps, ax_lat, ax_dev) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    fig.suptitle(title)

    rps = throughput(history)
    ax_rps.plot(rps.index - t0, rps["Requests/s"], label="requests/s")
    ax_rps.plot(rps.index - t0, rps["Failures/s"], label="failures/s", color="tab:red")
    users = history.groupby("Timestamp")["User Count"].max()
    ax_users = ax_rps.twinx()
    ax_users.step(users.index - t0, users, where="post", color="tab:gray", alpha=0.5, label="users")
    ax_users.set_ylabel("users")
    ax_rps.set_ylabel("throughput (req/s)")
    ax_rps.legend(loc="upper left")

    for label, frame, style in (
        ("whole request", request_percentiles(history), "-"),
        ("TTFT", entry_percentiles(history, "TTFT"), "--"),
        ("ITL", entry_percentiles(history, "ITL"), ":"),
    ):
        for pct, color in (("p50", "tab:blue"), ("p99", "tab:orange")):
            if not frame.empty:
                ax_lat.plot(frame.index - t0, frame[pct], style, color=color, label=f"{label} {pct}")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper left", ncol=3, fontsize="small")

    if devices is not None and not devices.empty:
        ax_dev.step(devices["Timestamp"] - t0, devices["Devices"], where="post", color="tab:green")
        sources = ", ".join(sorted(set(devices["Source"])))
        ax_dev.set_title(f"device count (source: {sources})", fontsize="small")
    ax_dev.set_ylabel("expert devices")
    ax_dev.set_xlabel("seconds since start")
    ax_dev.set_ylim(bottom=0)
    ax_dev.yaxis.get_major_locator().set_params(integer=True)

    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
