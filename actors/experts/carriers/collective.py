"""Collective carrier (per call): torch.distributed point-to-point, one small process group per
(attention replica, expert worker) pair, never the global default group.

Why pairs: a worker joining or leaving only creates or drops its own groups; every other
replica<->worker pair keeps its communicator. Rendezvous: each worker hosts a TCPStore on a port
the OS picks on its node address (pairs.bound_store) and advertises (node IP from Ray, port) through ExpertWorker.endpoint();
a replica asks the worker (Ray call `accept_peer`) to join a group under a fresh prefix, then joins
it itself as rank 0 (the worker is rank 1). Before any call, both sides prove they hold the
cluster secret inside the new control group (actors/experts/transport/rendezvous_auth.py): the
store's port is open to whoever reaches it.

Two lanes per pair:
  control  gloo, CPU: fixed-size int64 headers, group ids, routing ids and weights. A worker waits
           on it between calls, which only gloo tolerates (an idle NCCL/HCCL recv trips the watchdog).
  data     the device backend (nccl on CUDA, hccl on NPU; on CPU the control lane itself): x out,
           partials back. Only posted once the header says the peer is alive and ready.

Request header  [op, layer, n, T, D, k, x dtype, 0]; then group_ids [n], ids [T,k], weights [T,k]
                (control), x [T,D] (data).
Reply header    [status, n, T, D, y dtype, message bytes, 0, 0]; then y [n,T,D] (data) if status 0,
                else the error text as uint8 (control).
"""

from __future__ import annotations

import datetime
import queue
import threading
import uuid
from concurrent.futures import Future

import torch
import torch.distributed as dist

from actors.device import collective_backend
from actors.experts.carriers.base import Carrier, TransportError, WorkerRef
from actors.experts.carriers.pairs import abort_group, bound_store, make_group
from actors.experts.carriers.rendezvous_auth import prove

OP_CALL, OP_CLOSE = 1, 2
STATUS_OK, STATUS_ERROR = 0, 1
HEADER = 8
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IDLE_TIMEOUT = datetime.timedelta(days=7)  # a worker waits this long for a replica's next call


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class _Pair:
    """Both lanes of one replica<->worker pair, from one side. `peer` is the other side's rank."""

    def __init__(self, store, pair_id: str, rank: int, backend: str, device: torch.device, timeout,
                 secret: str | None = None, proof_timeout=None) -> None:
        self.peer = 1 - rank
        self.device = device if backend != "gloo" else torch.device("cpu")
        self.control = make_group("gloo", dist.PrefixStore(f"{pair_id}/control", store), rank, timeout)
        prove(self.control, rank, "cpu", proof_timeout or timeout, secret)  # before the data lane or any call
        if backend == "gloo":
            self.data = self.control
        else:
            self.data = make_group(backend, dist.PrefixStore(f"{pair_id}/data", store), rank, timeout)

    def send_ctl(self, t: torch.Tensor) -> None:
        self.control.send([t.contiguous()], self.peer, 0).wait()

    def recv_ctl(self, shape, dtype, timeout=None) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        work = self.control.recv([t], self.peer, 0)
        work.wait(timeout) if timeout is not None else work.wait()
        return t

    def send_data(self, t: torch.Tensor) -> None:
        self.data.send([t.to(self.device).contiguous()], self.peer, 1).wait()

    def recv_data(self, shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.data.recv([t], self.peer, 1).wait()
        return t

    def close(self) -> None:
        if self.data is not self.control:  # gloo groups go with their sockets; device groups need an abort
            abort_group(self.data)


# ---- worker side ------------------------------------------------------------------------------


class CollectiveServer:
    """Runs in the ExpertWorker's process: hosts the rendezvous store, serves one thread per pair."""

    def __init__(self, worker, host: str, options: dict) -> None:
        self.worker = worker
        self.host = host
        self.backend = options.get("backend") or collective_backend(worker.device.type)
        self.connect_timeout = _td(float(options.get("connect_timeout_s", 60)))
        self.secret = options.get("auth_token")  # None: the process's (rendezvous_auth)
        self.store = bound_store(host, self.connect_timeout)
        self._threads: dict[str, threading.Thread] = {}

    def address(self) -> dict:
        return {"host": self.host, "port": self.store.port, "backend": self.backend}

    def accept(self, pair_id: str) -> dict:
        """Start joining pair `pair_id` in the background: the replica joins right after this returns."""
        thread = threading.Thread(target=self._serve, args=(pair_id,), name=f"moge-pair-{pair_id}", daemon=True)
        self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
        self._threads[pair_id] = thread
        thread.start()
        return {"pair_id": pair_id, "rank": 1}

    def _serve(self, pair_id: str) -> None:
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)
        try:
            pair = _Pair(self.store, pair_id, 1, self.backend, self.worker.device, IDLE_TIMEOUT,
                         self.secret, self.connect_timeout)
        except Exception:  # noqa: BLE001 - the replica gave up joining or lacks the secret: nothing to serve
            return
        try:
            while True:
                op, layer, n, t, d, k, code, _ = pair.recv_ctl((HEADER,), torch.int64).tolist()
                if op == OP_CLOSE:
                    return
                group_ids = pair.recv_ctl((n,), torch.int64).tolist()
                ids = pair.recv_ctl((t, k), torch.int64)
                weights = pair.recv_ctl((t, k), torch.float32)
                x = pair.recv_data((t, d), _DTYPES[code])
                try:
                    y = self.worker.compute(layer, group_ids, x, ids, weights)
                except Exception as exc:  # noqa: BLE001 - report to the caller, keep serving
                    msg = torch.frombuffer(bytearray(str(exc).encode()[:4096] or b"?"), dtype=torch.uint8)
                    pair.send_ctl(torch.tensor([STATUS_ERROR, 0, 0, 0, 0, msg.numel(), 0, 0]))
                    pair.send_ctl(msg)
                    continue
                pair.send_ctl(torch.tensor([STATUS_OK, n, t, d, _dtype_code(y.dtype), 0, 0, 0]))
                pair.send_data(y)
        except Exception:  # noqa: BLE001 - peer gone: this pair is over, others are untouched
            return
        finally:
            pair.close()

    def stop(self) -> None:
        self._threads.clear()  # daemon threads end with the process or when their peer closes


# ---- replica side -----------------------------------------------------------------------------


class _Link:
    """One pair seen from the replica: a thread that sends queued calls in order and reads replies."""

    def __init__(self, worker_id: str, endpoint: dict, pair: _Pair, timeout_s: float) -> None:
        self.worker_id, self.endpoint, self.pair, self.timeout_s = worker_id, endpoint, pair, timeout_s
        self.broken: Exception | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"moge-link-{worker_id}", daemon=True)
        self._thread.start()

    def submit(self, args: tuple, fut: Future) -> None:
        if self.broken is not None:
            fut.set_exception(TransportError(f"worker {self.worker_id}: link broken: {self.broken}"))
        else:
            self._queue.put((args, fut))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            args, fut = item
            if self.broken is not None:
                fut.set_exception(TransportError(f"worker {self.worker_id}: link broken: {self.broken}"))
                continue
            try:
                fut.set_result(self._roundtrip(*args))
            except RemoteError as exc:
                fut.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - a dead peer or a deadline: the pair is unusable
                self.broken = exc
                fut.set_exception(TransportError(f"worker {self.worker_id}: {exc}"))

    def _roundtrip(self, layer, group_ids, x, ids, weights) -> torch.Tensor:
        p = self.pair
        t, d = x.shape
        k = ids.shape[1]
        p.send_ctl(torch.tensor([OP_CALL, layer, len(group_ids), t, d, k, _dtype_code(x.dtype), 0]))
        p.send_ctl(torch.tensor(list(group_ids), dtype=torch.int64))
        p.send_ctl(ids.to("cpu", torch.int64))
        p.send_ctl(weights.to("cpu", torch.float32))
        p.send_data(x)
        status, n, rt, rd, code, msg_len, _, _ = p.recv_ctl((HEADER,), torch.int64, _td(self.timeout_s)).tolist()
        if status != STATUS_OK:
            text = bytes(p.recv_ctl((msg_len,), torch.uint8, _td(self.timeout_s)).tolist()).decode(errors="replace")
            raise RemoteError(f"worker {self.worker_id}: {text}")
        return p.recv_data((n, rt, rd), _DTYPES[code]).to(x.device)

    def close(self) -> None:
        if self.broken is None:
            try:
                self.pair.send_ctl(torch.tensor([OP_CLOSE, 0, 0, 0, 0, 0, 0, 0]))
            except Exception:  # noqa: BLE001 - peer already gone
                pass
        self._queue.put(None)
        self.pair.close()


class RemoteError(RuntimeError):
    """The worker answered with an error (e.g. it does not hold a group); the pair stays usable."""


class CollectiveCarrier(Carrier):
    name = "collective"

    def __init__(
        self,
        device: torch.device | str = "cpu",
        backend: str | None = None,
        timeout_s: float = 30.0,
        replica_id: str | None = None,
        auth_token: str | None = None,
        **_: object,
    ) -> None:
        self.device = torch.device(device)
        self.auth_token = auth_token  # the cluster secret; None: the process's (rendezvous_auth)
        self.backend = backend or collective_backend(self.device.type)
        self.timeout_s = timeout_s
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}

    def connect(self, worker: WorkerRef) -> None:
        endpoint = worker.endpoint or worker.invoke("endpoint")
        with self._lock:
            old = self._links.get(worker.worker_id)
            if old is not None and old.endpoint == endpoint and old.broken is None:
                return
        if old is not None:
            self.disconnect(worker.worker_id)
        pair_id = f"{self.replica_id}/{worker.worker_id}/{uuid.uuid4().hex[:8]}"
        worker.invoke("accept_peer", pair_id, timeout=self.timeout_s)
        store = dist.TCPStore(endpoint["host"], int(endpoint["port"]), is_master=False, timeout=_td(self.timeout_s))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = endpoint.get("backend") or self.backend  # the worker's device decides the data lane
        pair = _Pair(store, pair_id, 0, backend, self.device, _td(self.timeout_s), self.auth_token)
        with self._lock:
            self._links[worker.worker_id] = _Link(worker.worker_id, endpoint, pair, self.timeout_s)

    def disconnect(self, worker_id: str) -> None:
        with self._lock:
            link = self._links.pop(worker_id, None)
        if link is not None:
            link.close()

    def connected(self) -> list[str]:
        return list(self._links)

    def call(self, worker_id, layer, group_ids, x, ids, weights) -> "Future[torch.Tensor]":
        fut: Future = Future()
        link = self._links.get(worker_id)
        if link is None:
            fut.set_exception(TransportError(f"worker {worker_id} is not connected"))
        else:
            link.submit((layer, list(group_ids), x, ids, weights), fut)
        return fut
