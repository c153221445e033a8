"""Devices arrive and leave as Ray nodes (KubeRay + the Ray autoscaler), on a multi-node Ray cluster
on this machine, under continuous greedy load with 0 failed requests and the reference's tokens.

The scenario (tests/integration/ray_nodes_scenario.py) runs once, in its own process: it needs its
own multi-node cluster, and this pytest process may already be the driver of the suite's shared
single-node Ray session. Each test below checks one part of its JSON result. About 40 s on 2 cores:

    PYTHONPATH=. flock /tmp/moge-cpu.lock timeout 600 python -m pytest -q tests/integration/test_ray_nodes.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ray-nodes") / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    # Own session: on a timeout the whole group (driver, raylets, workers, redis-server) goes.
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.ray_nodes_scenario", "--lose-node",
                             "--out", str(out)], cwd=REPO_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"scenario did not finish in {SCENARIO_TIMEOUT_S}s; last output:\n{log[-4000:]}")
    if not out.exists():
        pytest.fail(f"scenario wrote no result (rc {proc.returncode}); last output:\n{log[-4000:]}")
    r = json.loads(out.read_text())
    assert "error" not in r, f"scenario failed: {r['error']}\nresult so far: {r}\nlast output:\n{log[-3000:]}"
    return r


def test_scale_up_waits_for_a_node_and_lands_on_it(result):
    grow = result["grow"]
    # The worker could not be placed before the node came: Ray reported the demand the autoscaler
    # acts on, and serving went on meanwhile.
    assert grow["slot_demand"] >= 1 and not grow["scale_finished_before_node"] and grow["ready_after_node"]
    assert grow["served_while_pending"] > 0
    assert grow["phase"] == "done" and grow["workers"] == ["w0", grow["worker"]]
    # On the new node, not the head, and the controller reports where it is.
    assert result["w0_node_id"] == result["head_node_id"]
    assert grow["node_of_actor"] == grow["node_id"] != result["head_node_id"]
    assert grow["node_in_status"] == grow["node_id"]
    # It really served: it holds groups and computed tokens for requests that finished.
    assert grow["groups"] and grow["worker_tokens"] > 0 and grow["requests_on_both_nodes"] > 0


def test_scale_down_moves_groups_away_before_the_node_goes(result):
    shrink = result["shrink"]
    assert shrink["phase"] == "done" and shrink["workers"] == ["w0"]
    # the protocol's order: copies first, publish, every replica acknowledges, then the old holder drops
    order = [p for p in shrink["phases"] if p in ("loading", "published", "dropping", "done")]
    assert order == ["loading", "published", "dropping", "done"]
    assert shrink["worker_gone"]
    assert shrink["holders"] == [["w0"]] * len(shrink["holders"])
    assert shrink["replica_epoch"] == shrink["epoch"]
    assert shrink["requests_after_removal"] > 0


def test_node_lost_while_holding_groups_is_survived(result):
    lose = result["lose"]
    assert result["regrow"]["node_of_actor"] == lose["node_id"] and result["regrow"]["groups"]
    assert lose["retries"] > 0  # steps really hit the dead worker and were re-sent
    assert lose["slot_demand"] >= 1  # the replacement asked for a device, as the autoscaler sees it
    assert lose["requests_since_loss"] > 0
    # Whoever won the race (replica's replacement on the new node, or controller's repair onto w0),
    # the placement ended consistent (checked by the controller against the live workers).
    if lose["worker_node_now"] is not None:
        assert lose["worker_node_now"] == lose["replacement_node_id"]


def test_every_request_succeeded_with_the_reference_tokens(result):
    assert result["n_failures"] == 0, result["failures"]
    assert result["requests"] > 0 and result["expected_nonempty"]
    assert result["n_wrong_tokens"] == 0, result["wrong_examples"]
    assert result["consistency"] == []
