"""Traffic curves, device-count parsing, the run summary and the server options of loadtest/ (no
locust, no server)."""

from __future__ import annotations

import pytest

from loadtest import traffic_curves as tc
from loadtest.device_poller import devices_from_metrics, devices_from_status
from loadtest.summary import read_summary


def users_over(curve, step_s: float = 0.5) -> list[int]:
    out, t = [], 0.0
    while (users := curve.users_at(t)) is not None:
        out.append(users)
        t += step_s
    return out


def test_step_climbs_in_equal_stairs_and_stops():
    curve = tc.Step(peak_users=8, duration_s=40)
    assert [curve.users_at(t) for t in (0, 9.9, 10, 25, 39.9)] == [2, 2, 4, 6, 8]
    assert curve.users_at(40) is None
    users = users_over(curve)
    assert users == sorted(users) and len(set(users)) == 4


def test_spike_jumps_to_peak_only_in_the_middle_fifth():
    curve = tc.Spike(peak_users=10, duration_s=50)
    assert [curve.users_at(t) for t in (0, 19.9, 20, 29.9, 30, 49)] == [2, 2, 10, 10, 2, 2]


def test_ramp_grows_from_one_to_peak():
    curve = tc.Ramp(peak_users=9, duration_s=80)
    users = users_over(curve)
    assert users[0] == 1 and users[-1] in (8, 9) and users == sorted(users)


def test_diurnal_peaks_at_noon_and_is_symmetric():
    curve = tc.Diurnal(peak_users=20, duration_s=100)
    assert curve.users_at(0) == 2 and curve.users_at(50) == 20
    assert curve.users_at(25) == curve.users_at(75)
    assert max(users_over(curve)) == 20 and min(users_over(curve)) == 2


def test_curves_come_from_the_environment_and_bad_arguments_are_refused():
    assert tc.curve_from_env({}) is None
    curve = tc.curve_from_env({tc.ENV_SHAPE: "spike", tc.ENV_USERS: "6", tc.ENV_DURATION: "12"})
    assert curve == tc.Spike(6, 12.0)
    with pytest.raises(ValueError, match="unknown traffic shape 'sine'"):
        tc.make_curve("sine", 4, 10)
    with pytest.raises(ValueError, match="need users >= 1"):
        tc.make_curve("step", 0, 10)


def test_device_count_from_status_and_metrics():
    assert devices_from_status({"devices": 4}) == 4
    assert devices_from_status({"devices": [{"id": "w0"}, {"id": "w1"}]}) == 2
    assert devices_from_status({"workers": 3}) is None and devices_from_status([]) is None
    metrics = '# TYPE moge_devices gauge\nmoge_devices{replica="a"} 3\nmoge_devices{replica="b"} 4\nmoge_devices_total 9\n'
    assert devices_from_metrics(metrics) == 4
    assert devices_from_metrics("moge_requests_total 5\n") is None


def test_summary_counts_requests_but_not_latency_samples(tmp_path):
    header = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n"
    rows = [
        "POST,/v1/completions,10,1,5,5,1,9,10,2.0,0.2,5,5,5,5,5,5,5,9,9,9,9",
        "GET,/v1/models,1,0,3,3,3,3,10,0.1,0,3,3,3,3,3,3,3,3,3,3,3",
        "TTFT,all streams,7,0,40,40,30,50,0,1.4,0,40,40,40,40,40,40,40,50,50,50,50",
        ",Aggregated,18,1,5,5,1,50,5,3.5,0.2,5,5,5,5,5,40,40,50,50,50,50",
    ]
    path = tmp_path / "locust_stats.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    summary = read_summary(path)
    assert summary.request_count == 11 and summary.failure_count == 1
    assert summary.entry("TTFT").p99_ms == 50
    assert "| TTFT | `all streams` | 7 | 0 | 40 | 50 | 1.40 |" in summary.markdown()
    assert "Aggregated" not in summary.markdown()


@pytest.mark.parametrize("key", ["plain-key_1", "-starts-with-a-dash", "--two-dashes"])
def test_the_runner_hands_moge_serve_any_generated_key(key):
    """token_urlsafe keys can start with "-": `moge serve` must still read them as the key."""
    from cluster.cli.main import build_parser
    from loadtest.runner import key_args

    args = build_parser().parse_args(["serve", *key_args(key)])
    assert args.api_keys == [key] and args.admin_keys == [key]
