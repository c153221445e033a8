"""One server per port: a port another process listens on (even with SO_REUSEPORT, as Ray Serve's
proxy does) is refused before anything starts, naming its owner; `moge serve` exits 2 saying so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli.ports import PortTaken, check_free

ROOT = Path(__file__).resolve().parents[2]


def listener(reuse_port: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_taken_port_is_refused_and_its_owner_named(reuse_port):
    with listener(reuse_port) as s:
        port = s.getsockname()[1]
        with pytest.raises(PortTaken) as e:
            check_free("127.0.0.1", port)
        assert f"port {port}" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    check_free("127.0.0.1", port)  # free again once closed


def test_moge_serve_exits_2_on_a_taken_port_before_starting_anything():
    with listener(True) as s:
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "cluster.cli.main", "serve", "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in out.stderr
    assert "starting" not in out.stdout  # refused before Ray
