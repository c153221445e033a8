"""The step lane's wire format, shared by the replica side (transport/step_lane.py) and the worker
side (experts/worker_lane.py).

A lane is one 2-rank process group per (attention replica, expert worker) (an extra slot lane only for
micro-batches nobody announced, on gloo tests): nccl
when both ends are CUDA devices (hccl on NPU), gloo otherwise. Per step it carries:

  header   int64 [HEADER_LEN] once per step (a device tensor on nccl):
           [op, epoch, n_layers, t_bucket, t_real, x dtype code, reply dtype code, d, k,
            t_bucket2, t_real2, 0...]
           t_bucket2 > 0: the step has a second micro-batch (ping-pong) on the same lane; its
           layers interleave with the first's, A0 B0 A1 B1 ..., in both directions.
  packet   uint8 [t_bucket, row_bytes] once per MoE layer, replica -> worker: each row is the
           token's activations (D values of the model dtype), then its K routing ids (int32, -1 =
           not for this worker) and K weights (float32), bit-cast into bytes so one send moves all.
  partial  [t_bucket, D] once per MoE layer, worker -> replica: the token's routed-expert output
           over the slots the replica left unmasked, weighted and summed over the worker's groups
           (model dtype when the worker serves every group, float32 otherwise so the replica's
           cross-worker sum rounds once).

Rows past t_real carry id -1 and weight 0 (nothing computed). Buckets keep shapes fixed so each
side can replay one CUDA graph per bucket.

Shape legend: T = tokens, Tb = bucket, D = hidden, K = expert slots per token.
"""

from __future__ import annotations

import torch

HEADER_LEN = 16
OP_STEP, OP_CLOSE, OP_HELLO = 1, 2, 3
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype)


def bucket(t: int) -> int:
    """Rows a step of t tokens is padded to: powers of two up to 256, then multiples of 256
    (at most 2x padding for small batches, < 1.2x for prefill-sized steps)."""
    if t <= 256:
        return 1 << max(0, (t - 1).bit_length())
    return -(-t // 256) * 256


def row_bytes(d: int, k: int, dtype: torch.dtype) -> int:
    return d * dtype.itemsize + 8 * k


def header(op: int, epoch: int = 0, n_layers: int = 0, t_bucket: int = 0, t_real: int = 0,
           x_dtype: torch.dtype = torch.float32, reply_dtype: torch.dtype = torch.float32,
           d: int = 0, k: int = 0, t_bucket2: int = 0, t_real2: int = 0) -> list[int]:
    out = [op, epoch, n_layers, t_bucket, t_real, dtype_code(x_dtype), dtype_code(reply_dtype), d, k,
           t_bucket2, t_real2]
    return out + [0] * (HEADER_LEN - len(out))


class PacketView:
    """Typed views into one packet buffer [Tb, row_bytes] (no copies)."""

    def __init__(self, buf: torch.Tensor, d: int, k: int, dtype: torch.dtype) -> None:
        xb = d * dtype.itemsize
        self.buf = buf
        self.x = buf[:, :xb].view(dtype)  # [Tb, D]
        self.ids = buf[:, xb : xb + 4 * k].view(torch.int32)  # [Tb, K]
        self.weights = buf[:, xb + 4 * k :].view(torch.float32)  # [Tb, K]
        self.id_bytes = buf[:, xb : xb + 4 * k]
        self.weight_bytes = buf[:, xb + 4 * k :]

    def clear_tail(self, t: int) -> None:
        """Rows t.. carry no slots: id -1 (all bits set), weight 0."""
        self.id_bytes[t:].fill_(255)
        self.weight_bytes[t:].zero_()

    def fill(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Rows [0, T) from x [T, D], ids [T, K] (any int dtype, -1 = masked), weights [T, K]."""
        t = x.shape[0]
        self.x[:t].copy_(x)
        self.ids[:t].copy_(ids)
        self.weights[:t].copy_(weights)


def new_packet(t_bucket: int, d: int, k: int, dtype: torch.dtype, device) -> PacketView:
    buf = torch.empty(t_bucket, row_bytes(d, k, dtype), dtype=torch.uint8, device=device)
    view = PacketView(buf, d, k, dtype)
    view.x.zero_()
    view.clear_tail(0)
    return view
