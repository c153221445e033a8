"""Device-to-device copies of expert groups: the holder's tensors go over a 2-rank process group
(nccl on CUDA, hccl on NPU, gloo on CPU) straight into buffers the target allocated for them, so
the bytes never touch the host or the Ray object store and the target never holds two copies.

Why not Ray Direct Transport (`@ray.method(tensor_transport="nccl")`, Ray 2.60): it needs a
collective group declared among actors up front (and cupy for nccl), hands the receiver freshly
allocated tensors instead of filling its final buffers, is alpha, and one holder here is not an
actor at all (the attention replica holding its own groups, the "local" holder). So each holder
runs a `GroupCopyServer` instead, which needs no Ray call to be reached:

  rendezvous  the holder hosts a TCPStore on a port the OS picks on its node address (not every
              interface) and advertises {host, port, backend} (ExpertWorker.endpoint()["copy"],
              or the replica's entry in Redis).
  request     the target takes a ticket n = store.add("seq", 1) and writes req/<n> = the manifest
              it expects, [(group, layer, "w13"|"w2", shape, dtype)] in send order, signed with the
              cluster secret (rendezvous_auth.sign): TCPStore has no authentication, so the
              holder acts on no request that does not verify, and on no value it cannot parse
              (it drops it and goes on; a ticket nobody fills is skipped after a while).
  answer      the holder checks the manifest against what it holds and writes resp/<copy_id>
              ("ok" or the reason), then both join a fresh 2-rank group under prefix <copy_id>
              (holder rank 0, target rank 1), both prove they hold the cluster secret inside
              it (rendezvous_auth: anyone reaching the port can write a request, so the holder
              sends nothing to a peer that cannot), then the holder sends every tensor in manifest order,
              the target receives each into its preallocated buffer; both tear the group down.
Every wait has a deadline (`timeout_s`): a holder that does not answer, or stops sending, makes
the target raise `CopyFailed`, and the caller falls back (object store, then checkpoint).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Callable

import torch
import torch.distributed as dist

from actors.device import collective_backend
from actors.model.config import ModelConfig
from actors.model.experts import ExpertGroupWeights
from actors.experts.carriers.pairs import abort_group, bound_store, make_group
from actors.experts.carriers.rendezvous_auth import prove, sign, verify

log = logging.getLogger(__name__)

_REQUEST = "group-copy-request"
SKIP_TICKET_S = 10.0  # a ticket taken but never written is skipped after this long
LOOP_POLL_S = 0.05  # how often the request loop looks for the next request
MAX_REQUEST_BYTES = 1 << 20
_LIVE: "weakref.WeakSet[GroupCopyServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # a request loop still blocked inside TCPStore.wait while the interpreter tears the store down
    # aborts the process ("terminate called without an active exception"): end the loops first
    for server in list(_LIVE):
        server.stop()


class CopyFailed(RuntimeError):
    """The device lane could not deliver the groups (no lane, refused, or past the deadline)."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_of(cfg: ModelConfig, groups: list[int], dtype: torch.dtype) -> list[list]:
    """What a copy of `groups` carries, in send order: one entry per (group, MoE layer, tensor)."""
    eg, inner, d = cfg.experts_per_group, cfg.moe_intermediate_size, cfg.hidden_size
    out = []
    for g in sorted(groups):
        for layer in range(cfg.num_layers):
            if cfg.is_moe_layer(layer):
                out.append([g, layer, "w13", [eg, 2 * inner, d], _dtype_name(dtype)])
                out.append([g, layer, "w2", [eg, d, inner], _dtype_name(dtype)])
    return out


def allocate_groups(cfg: ModelConfig, groups: list[int], dtype: torch.dtype,
                    device: torch.device) -> dict[int, ExpertGroupWeights]:
    """The target's final buffers for `groups` (uninitialised; the copy fills every byte)."""
    out: dict[int, ExpertGroupWeights] = {}
    for g, layer, name, shape, _ in manifest_of(cfg, groups, dtype):
        w = out.setdefault(g, ExpertGroupWeights(g, cfg.experts_of_group(g).start))
        getattr(w, name)[layer] = torch.empty(shape, dtype=dtype, device=device)
    return out


POLL_S = 1e-3  # a settle poll's sleep: the engine's step thread shares the GIL with this one


def _copy_stream(device: torch.device):
    """A CUDA stream of its own for a copy's point-to-point operations. On the thread's current
    stream (the default stream, which the engine computes on) Work.wait() would queue the engine's
    next kernels behind the whole copy: a holder that serves while it computes stalled for the
    transfer (0.002 of steady throughput on 2x H200 before this)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # what was queued before (e.g. a restack), not after
    return stream


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _settle(device: torch.device, deadline: float, stream=None) -> None:
    """Host-wait, up to `deadline`, until the point-to-point operations this thread waited on
    (Work.wait() only orders the copy's stream after them on nccl) have finished on the device:
    before the communicator is torn down (an abort cancels a send still in flight) and before the
    target hands its buffers out. Polls an event on the copy's stream every POLL_S rather than
    synchronizing the device (which would also wait for the engine's work and for other
    communicators' posted receives, e.g. a worker's idle step lanes); a tighter poll would take the
    GIL from the engine's step thread thousands of times a second."""
    if device.type != "cuda":
        return
    ev = torch.cuda.Event()
    ev.record(stream if stream is not None else torch.cuda.current_stream(device))
    while not ev.query():
        if time.monotonic() > deadline:
            raise CopyFailed("the device copy did not finish before its deadline")
        time.sleep(POLL_S)


class GroupCopyServer:
    """Holder side. `held()` returns the holder's current {group: ExpertGroupWeights} (a snapshot:
    a group dropped meanwhile is still sent from the snapshot, never half-freed)."""

    def __init__(self, held: Callable[[], dict[int, ExpertGroupWeights]], device: torch.device,
                 host: str = "127.0.0.1", backend: str | None = None, timeout_s: float = 60.0,
                 secret: str | None = None) -> None:
        self.held = held
        self.secret = secret  # the cluster secret; None: the process's (rendezvous_auth)
        self.device = device
        self.host = host
        self.backend = backend or collective_backend(device.type)
        self.timeout_s = timeout_s
        self.store = bound_store(host, _td(timeout_s))
        self.copies_served = 0
        self.requests_refused = 0  # values in the store that were not a signed request (metric, tests)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="moge-group-copy", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def address(self) -> dict:
        return {"host": self.host, "port": self.store.port, "backend": self.backend}

    def _client(self):
        # one connection per waiter: a TCPStore client blocked in wait() holds its socket, so the
        # request loop and every copy in flight each get their own
        return dist.TCPStore(self.host, self.store.port, is_master=False, timeout=_td(self.timeout_s))

    def _loop(self) -> None:
        try:
            store = self._client()
        except Exception:  # noqa: BLE001
            return
        served = 0
        missing_since = None
        while not self._stopped:
            key = f"req/{served + 1}"
            try:
                ready = store.check([key])  # polled: a blocking wait would outlive stop()
                taken = store.add("seq", 0) if not ready else 0
            except Exception:  # noqa: BLE001 - the store is gone: the process is ending
                return
            if not ready:
                now = time.monotonic()
                if taken <= served:
                    missing_since = None  # nobody holds the next ticket yet
                elif missing_since is None:
                    missing_since = now
                elif now - missing_since > SKIP_TICKET_S:
                    served += 1  # a ticket whose request never came: skip it, serve the ones after
                    missing_since = None
                time.sleep(LOOP_POLL_S)
                continue
            missing_since = None
            served += 1
            try:
                raw = store.get(key)
                store.delete_key(key)
            except Exception:  # noqa: BLE001
                return
            req, refusal = self._verified(raw)
            if req is None:
                self.requests_refused += 1
                if refusal is not None:  # a well-formed request without the secret: told at once, given nothing
                    try:
                        store.set(f"resp/{refusal}", "error: the request is not signed with the cluster secret")
                    except Exception:  # noqa: BLE001
                        return
                continue
            threading.Thread(target=self._serve, args=(req,), name="moge-group-send", daemon=True).start()

    def _verified(self, raw: bytes) -> tuple[dict | None, str | None]:
        """(the request, None) if `raw` is one signed with the cluster secret; (None, its copy id)
        for a well-formed but unsigned one; (None, None) for anything else."""
        try:
            if len(raw) > MAX_REQUEST_BYTES:
                return None, None
            envelope = json.loads(raw)
            body = envelope["body"]
            req = json.loads(body)
            copy_id = req.get("copy_id")
            if not isinstance(copy_id, str) or not copy_id.startswith("copy-") or len(copy_id) > 64:
                return None, None
            if not verify(_REQUEST, body.encode(), envelope.get("tag"), self.secret):
                return None, copy_id
            if not isinstance(req.get("manifest"), list):
                return None, None
            return req, None
        except Exception:  # noqa: BLE001 - garbage of any kind: not a request
            return None, None

    def _serve(self, req: dict) -> None:
        copy_id = req["copy_id"]
        try:
            store = self._client()
        except Exception:  # noqa: BLE001
            return
        try:
            tensors = self._tensors(req["manifest"])
        except Exception as exc:  # noqa: BLE001 - refuse (any malformed entry too): the target falls back
            store.set(f"resp/{copy_id}", f"error: {exc}")
            return
        store.set(f"resp/{copy_id}", "ok")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        pg = None
        stream = _copy_stream(self.device)
        try:
            deadline = time.monotonic() + self.timeout_s
            pg = make_group(self.backend, dist.PrefixStore(copy_id, store), 0, _td(self.timeout_s))
            prove(pg, 0, self.device if self.backend != "gloo" else "cpu", _td(self.timeout_s), self.secret)
            with _on(stream):  # the sends wait for nothing the engine queued after the snapshot
                works = [pg.send([t], 1, 0) for t in tensors]
                for w in works:
                    w.wait(_td(self.timeout_s))
            _settle(self.device, deadline, stream)  # every byte left before the abort below
            self.copies_served += 1
        except Exception as exc:  # noqa: BLE001 - the target gave up; it falls back on its side
            log.warning("group copy %s failed on the holder: %s", copy_id, exc)
        finally:
            if pg is not None:
                abort_group(pg)

    def _tensors(self, manifest: list[list]) -> list[torch.Tensor]:
        held = self.held()
        out = []
        for g, layer, name, shape, dtype in manifest:
            if g not in held:
                raise KeyError(f"group {g} is not held here")
            t = getattr(held[g], name).get(layer)
            if t is None or list(t.shape) != list(shape) or _dtype_name(t.dtype) != dtype:
                got = None if t is None else (list(t.shape), _dtype_name(t.dtype))
                raise ValueError(f"group {g} layer {layer} {name}: holder has {got}, target wants {(shape, dtype)}")
            if t.device.type != self.device.type:
                raise ValueError(f"group {g} is on {t.device}, not the lane's device {self.device}")
            out.append(t if t.is_contiguous() else t.contiguous())
        return out

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True  # the loop looks at this between its polls
        self._thread.join(5)


def copy_groups(endpoint: dict, cfg: ModelConfig, groups: list[int], dtype: torch.dtype, device: torch.device,
                timeout_s: float = 30.0, secret: str | None = None) -> tuple[dict[int, ExpertGroupWeights], dict]:
    """Target side: receive `groups` from the holder at `endpoint` into freshly allocated final
    buffers. -> (groups, {"bytes", "seconds", "connect_s"}). Raises CopyFailed (nothing kept).

    The copy runs on its own thread and is abandoned at the deadline: a TCPStore client talking
    to a frozen holder (SIGSTOP, a wedged process) blocks past its own timeout, and only the
    holder waking or dying frees that thread (it keeps its buffers until then)."""
    if not endpoint or "port" not in endpoint:
        raise CopyFailed("the holder advertises no copy lane")
    backend = endpoint.get("backend") or "gloo"
    if backend != collective_backend(device.type):
        raise CopyFailed(f"holder lane is {backend}, this device ({device.type}) speaks {collective_backend(device.type)}")
    box: Future = Future()
    pgs: list = []

    def run() -> None:
        try:
            box.set_result(_receive(endpoint, backend, cfg, groups, dtype, device, timeout_s, pgs, secret))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.set_exception(exc)

    threading.Thread(target=run, name="moge-group-recv", daemon=True).start()
    try:
        return box.result(timeout=timeout_s + 1.0)
    except FutureTimeout:
        for pg in pgs:
            abort_group(pg)
        raise CopyFailed(f"the holder did not deliver groups {groups} within {timeout_s}s") from None
    except CopyFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable holder, deadline, broken communicator
        raise CopyFailed(f"{type(exc).__name__}: {exc}") from exc


def _receive(endpoint, backend, cfg, groups, dtype, device, timeout_s, pgs, secret=None):
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    left = lambda: _td(deadline - time.monotonic())  # noqa: E731
    buffers = allocate_groups(cfg, groups, dtype, device)
    manifest = manifest_of(cfg, groups, dtype)
    copy_id = f"copy-{uuid.uuid4().hex[:12]}"
    pg = None
    try:
        store = dist.TCPStore(endpoint["host"], int(endpoint["port"]), is_master=False, timeout=left())
        n = store.add("seq", 1)
        body = json.dumps({"copy_id": copy_id, "manifest": manifest})
        store.set(f"req/{n}", json.dumps({"body": body, "tag": sign(_REQUEST, body.encode(), secret)}))
        store.wait([f"resp/{copy_id}"], left())
        answer = store.get(f"resp/{copy_id}").decode()
        if answer != "ok":
            raise CopyFailed(f"holder refused: {answer}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pg = make_group(backend, dist.PrefixStore(copy_id, store), 1, left())
        pgs.append(pg)
        prove(pg, 1, device if backend != "gloo" else "cpu", left(), secret)
        connect_s = time.perf_counter() - start
        order = [getattr(buffers[g], name)[layer] for g, layer, name, _, _ in manifest]
        stream = _copy_stream(device)
        with _on(stream):  # off the engine's stream: a replica fetching groups keeps serving
            works = [pg.recv([t], 0, 0) for t in order]
            for w in works:
                if not w.wait(left()):
                    raise CopyFailed("receive did not complete")
        _settle(device, deadline, stream)
    finally:
        if pg is not None:
            abort_group(pg)
    nbytes = sum(w.nbytes for w in buffers.values())
    return buffers, {"bytes": nbytes, "seconds": time.perf_counter() - start, "connect_s": connect_s}
