"""One server per port: before Serve's proxy starts, its port must be free.

Ray Serve's HTTP proxy binds with SO_REUSEPORT, so a second, independent `moge serve` on a taken
port would start "successfully" and the kernel would split connections between two clusters.
`check_free` binds the port the plain way (no SO_REUSEPORT: any listener already there makes it
fail) and, when it is taken, names the process holding it where /proc lets us see it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class PortTaken(RuntimeError):
    pass


def check_free(host: str, port: int) -> None:
    """Raise PortTaken (saying by what, if it can) unless `port` can be bound on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind_host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            owner = port_owner(port)
            raise PortTaken(f"port {port} on {host or '0.0.0.0'} is already in use"
                            + (f" by {owner}" if owner else "") + "; stop it or pick another --port") from None


def port_owner(port: int) -> str | None:
    """'pid N (command line)' of a process listening on `port`, from /proc (Linux; None elsewhere
    or when the process belongs to someone we may not look at)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid} ({cmd.strip()[:120]})"
        except OSError:
            continue
    return None
