"""2-rank process groups (torch.distributed, never the global default group) and the rendezvous
store they form through: shared by the collective carrier, the step lane and the group copy.

The store's server listens on the node address it is given, not on every interface (TCPStore's own
master binds all of them): the socket is bound here and handed over (`master_listen_fd`). Whoever
reaches it still learns nothing: every group formed through it proves the cluster secret before
any payload moves (rendezvous_auth.py).
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def bound_store(host: str, timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCPStore server on an OS-chosen port of `host` only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # detach: the store's server owns the descriptor from here on (the socket object would close it)
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout,
                         master_listen_fd=sock.detach())


def make_group(backend: str, store, rank: int, timeout: datetime.timedelta):
    """A standalone 2-rank ProcessGroup object (not registered as the default group)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    if backend == "hccl":
        try:
            import torch_npu  # noqa: F401
            from torch_npu._C._distributed_c10d import ProcessGroupHCCL
        except ImportError as exc:
            raise RuntimeError("the hccl backend needs torch_npu") from exc
        opts = ProcessGroupHCCL.Options()
        opts._timeout = timeout
        return ProcessGroupHCCL(store, rank, 2, opts)
    raise ValueError(f"unknown collective backend {backend!r}")


def abort_group(pg) -> None:
    """Tear down a device communicator (gloo groups go with their sockets; NCCL/HCCL ones must be
    aborted or they leak). Errors from a finished or broken communicator are expected here."""
    for method in ("abort", "shutdown"):
        fn = getattr(pg, method, None)
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - tearing down a broken communicator
                pass
            return
