"""One lane seen from the replica (rank 0): a 2-rank communicator to one expert worker (nccl
between CUDA devices, hccl on NPU, gloo otherwise) opened through the worker's `accept_lane`,
its header buffer, and the per-(bucket, micro-batch) packet and reply buffers that captured
steps reuse (fixed addresses). Wire format: wire.py.

Shape legend: Tb = rows on the wire, D = hidden, K = slots per token, n = the lane's groups.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid

import torch
import torch.distributed as dist

from actors.experts.carriers.pairs import abort_group, make_group
from actors.experts.carriers.rendezvous_auth import prove
from actors.experts.lane.wire import HEADER_LEN, OP_CLOSE, OP_HELLO, header, new_packet

log = logging.getLogger(__name__)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without blocking the host (a pageable copy waits for
    the whole stream, which would stall the CPU mid-step, e.g. at the second micro-batch)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # the pinned block is freed after the copy ran
    return t.to(device)


class DeviceTimeout(RuntimeError):
    pass


def await_device(deadline: float, what: str, spin_s: float = 0.005) -> None:
    """Poll the current stream up to `deadline` (nccl failures never raise on the host). Spins
    for the first `spin_s` (a step usually ends within it; a sleep would add its own wake-up
    latency to every step), then sleeps between polls."""
    ev = torch.cuda.Event()
    ev.record()
    spin_until = time.monotonic() + spin_s
    while not ev.query():
        now = time.monotonic()
        if now > deadline:
            raise DeviceTimeout(f"{what}: step lane timed out")
        if now > spin_until:
            time.sleep(50e-6)


def abort_bounded(pg, seconds: float) -> None:
    """Abort a communicator from a helper thread, waiting at most `seconds`: an abort racing a
    kernel stuck on a dead peer was seen hanging (2x H200), and the replica must go on to its
    fallback path rather than hang with it."""
    t = threading.Thread(target=abort_group, args=(pg,), name="moge-lane-abort", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        log.warning("step lane: communicator abort still running after %.0f s; going on", seconds)


class ReplicaLane:
    def __init__(self, ref, device: torch.device, timeout_s: float, replica_id: str) -> None:
        self.ref, self.device, self.timeout_s = ref, device, timeout_s
        self.worker_id = ref.worker_id
        self.lane_id = f"{replica_id}/{ref.worker_id}/{uuid.uuid4().hex[:8]}"
        info = ref.invoke("accept_lane", self.lane_id, "gloo" if device.type == "cpu" else None, timeout=timeout_s)
        self.backend = info["backend"]
        store = dist.TCPStore(info["host"], int(info["port"]), is_master=False, timeout=_td(timeout_s))
        if self.backend != "gloo":
            torch.cuda.set_device(device)
        self.pg = make_group(self.backend, dist.PrefixStore(self.lane_id, store), 0, _td(timeout_s))
        self.wire = device if self.backend != "gloo" else torch.device("cpu")
        prove(self.pg, 0, self.wire, _td(timeout_s))  # the cluster secret, before the first header
        # the header's one buffer: eager steps and every captured bucket send from it (static address)
        self.hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        self.broken: Exception | None = None
        self._bufs: dict[tuple, tuple] = {}
        self._hdr_work = None
        self.write_header(header(OP_HELLO))  # creates the communicator now, not in the first step
        self.post_header()

    def write_header(self, h: list[int]) -> None:
        """Fill the header buffer (on the current stream) for the next post_header or replay."""
        if self._hdr_work is not None and self.backend != "gloo":
            # nccl sends read `hdr` on the communicator's stream: the overwrite below (on the
            # current stream) must not run before the previous eager header left (e.g. HELLO then
            # STEP). A header sent by a graph replay needs no wait: the replay ended (on the
            # current stream) only after every op in it, the header's send included.
            self._hdr_work.wait()
        self._hdr_work = None
        self.hdr.copy_(to_device(torch.tensor(h, dtype=torch.int64), self.wire))

    def post_header(self, capturing: bool = False):
        work = self.pg.send([self.hdr], 1, 0)
        if self.backend == "gloo":
            work.wait(_td(self.timeout_s))
        elif not capturing:  # a work made during capture must never be waited on outside it
            self._hdr_work = work
        return work

    def buffers(self, tb: int, d: int, k: int, dtype: torch.dtype, reply_shape: tuple, mb: int):
        """Static per (bucket, shapes, micro-batch): micro-batches on one lane are in flight together."""
        key = (tb, d, k, dtype, reply_shape, mb)
        if key not in self._bufs:
            reply = torch.empty(reply_shape, dtype=dtype, device=self.wire)
            self._bufs[key] = (new_packet(tb, d, k, dtype, self.wire), reply)
        return self._bufs[key]

    def send_layer(self, bufs, x, ids, weights) -> tuple:
        """Post the layer's packet out and its partials back; -> the (send, recv) works."""
        packet, reply = bufs
        packet.fill(x, ids, weights)
        return self.pg.send([packet.buf], 1, 1), self.pg.recv([reply], 1, 2)

    def finish_layer(self, bufs, works, deadline: float | None) -> torch.Tensor:
        """The layer's reply (lane buffer: consume before the next layer). gloo waits on the host
        up to `deadline`; nccl orders the current stream after the receive and, given a
        deadline, polls the device against it (DeviceTimeout)."""
        send, recv = works
        if self.backend == "gloo":
            end = deadline if deadline is not None else time.monotonic() + self.timeout_s
            send.wait(_td(end - time.monotonic()))
            recv.wait(_td(end - time.monotonic()))
        else:
            recv.wait()  # the current stream waits on the device; the host does not
            if deadline is not None:
                await_device(deadline, self.worker_id)
        return bufs[1]

    def close(self) -> None:
        if self.broken is None:
            try:
                self.write_header(header(OP_CLOSE))
                work = self.post_header()
                if self.backend != "gloo":
                    work.wait()  # the current stream now follows the send, so polling it waits for it:
                    # the abort below would otherwise cancel the CLOSE before the worker read it
                    await_device(time.monotonic() + min(self.timeout_s, 5.0), self.worker_id)
            except Exception:  # noqa: BLE001 - the worker is gone already
                pass
        self.abort()

    def abort(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None:
            return
        if self.backend != "gloo":
            abort_bounded(pg, min(self.timeout_s, 10.0))
        else:
            reap(pg, self.timeout_s)


def reap(pg, seconds: float) -> None:
    """Let go of a broken gloo group on a thread of its own: its destructor joins gloo's threads,
    which wait out a receive from a stopped peer (up to the group's timeout). Dropped on the step
    thread, it would stall the step that long."""
    box = [pg]

    def hold() -> None:
        time.sleep(seconds + 1.0)
        box.clear()  # the destructor runs here

    threading.Thread(target=hold, name="moge-lane-reap", daemon=True).start()
