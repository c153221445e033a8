"""The cluster secret on the torch.distributed rendezvous (collective pairs, step lanes, group copies).

Those three open a 2-rank process group through a TCPStore on an OS-chosen port. TCPStore has no
authentication and lists its keys (`list_keys`) to anyone who connects, so nothing written in the
store can be a secret: whoever reaches the port can read a pair's prefix and race to join as the
other rank. The check therefore runs inside the freshly formed group, before any payload: each side
sends a fresh random nonce and answers the other's with HMAC-SHA256(secret, role | nonce); a side
whose peer's answer does not verify raises `RendezvousRefused` and tears the group down. A joiner
without the secret learns nothing (no weights, no compute) and cannot replay a tag (nonces are new
per group). Ranks take turns (rank 0 sends first) so NCCL/HCCL groups cannot deadlock.

The secret is the expert-RPC cluster secret (cluster/security/cluster_secret.py). It reaches a
worker in its transport options (Ray actor argument) and a replica when it builds its transport;
either installs it for the process with `set_process_secret`, which every rendezvous uses unless
given one explicitly. No secret (single-process tests) is the empty key on both sides: still
consistent, and a process that has one refuses a peer that has none.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os

import torch

NONCE_BYTES = 32
_LABEL = b"moge-rendezvous/v1/"
_process_secret: bytes | None = None


class RendezvousRefused(RuntimeError):
    """The peer in a fresh process group did not prove it holds the cluster secret."""


def set_process_secret(secret: str | bytes | None) -> None:
    global _process_secret
    _process_secret = _bytes(secret)


def process_secret() -> bytes | None:
    return _process_secret


def _bytes(secret: str | bytes | None) -> bytes | None:
    return secret.encode() if isinstance(secret, str) else secret


def _tag(key: bytes, rank: int, nonce: bytes) -> bytes:
    return hmac.new(key, _LABEL + bytes([rank]) + nonce, hashlib.sha256).digest()


def _turn(pg, rank: int, out: torch.Tensor, into: torch.Tensor, timeout: datetime.timedelta | None) -> None:
    peer = 1 - rank
    ops = [lambda: pg.send([out], peer, 7), lambda: pg.recv([into], peer, 7)]
    for op in ops if rank == 0 else reversed(ops):
        work = op()
        work.wait(timeout) if timeout is not None else work.wait()


def prove(pg, rank: int, device: torch.device | str = "cpu", timeout: datetime.timedelta | None = None,
          secret: str | bytes | None = None) -> None:
    """Both ranks call this right after building the group; raises RendezvousRefused on a peer
    without the secret (or a timeout/transport error if the peer never answers)."""
    key = _bytes(secret) if secret is not None else _process_secret
    key = key or b""
    device = torch.device(device)
    mine = os.urandom(NONCE_BYTES)
    theirs = torch.empty(NONCE_BYTES, dtype=torch.uint8, device=device)
    _turn(pg, rank, torch.tensor(list(mine), dtype=torch.uint8, device=device), theirs, timeout)
    answer = _tag(key, rank, bytes(theirs.cpu().tolist()))
    got = torch.empty(len(answer), dtype=torch.uint8, device=device)
    _turn(pg, rank, torch.tensor(list(answer), dtype=torch.uint8, device=device), got, timeout)
    if not hmac.compare_digest(bytes(got.cpu().tolist()), _tag(key, 1 - rank, mine)):
        raise RendezvousRefused("the peer of this process group does not hold the cluster secret")


def sign(label: str, payload: bytes, secret: str | bytes | None = None) -> str:
    """A hex HMAC-SHA256 of `payload` under the cluster secret, for a request written into a
    store anyone may read (the group copy's): the holder acts on nothing that does not verify."""
    key = (_bytes(secret) if secret is not None else _process_secret) or b""
    return hmac.new(key, _LABEL + label.encode() + b"|" + payload, hashlib.sha256).hexdigest()


def verify(label: str, payload: bytes, tag: object, secret: str | bytes | None = None) -> bool:
    return isinstance(tag, str) and hmac.compare_digest(tag, sign(label, payload, secret))
