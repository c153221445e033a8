"""The step lane's wire format, shared by the replica side (lane/step_lane.py) and the worker side
(lane/worker_lane.py).

A lane is one 2-rank process group per (attention replica, expert worker) (an extra slot lane only for
micro-batches nobody announced, on gloo tests): nccl
when both ends are CUDA devices (hccl on NPU), gloo otherwise. Per step it carries:

  header   int64 [HEADER_LEN] once per step (a device tensor on nccl):
           [op, epoch, n_layers, t_bucket, t_real, x dtype code, whole, d, k,
            t_bucket2, t_real2, group mask words...]
           t_bucket2 > 0: the step has a second micro-batch (ping-pong) on the same lane; its
           layers interleave with the first's, A0 B0 A1 B1 ..., in both directions. The mask
           words name the groups the lane serves this step (62 groups a word).
  packet   uint8 [t_bucket, row_bytes] once per MoE layer, replica -> worker: each row is the
           token's activations (D values of the model dtype), then its K routing ids (int32, -1 =
           not for this worker) and K weights (float32), bit-cast into bytes so one send moves all.
  partials [n, t_bucket, D] once per MoE layer, worker -> replica, in the model dtype: each of the
           lane's n groups' weighted partial over the slots the replica left unmasked, so the
           replica adds every group in ascending order whatever the placement (bit-identical to
           one process). `whole` (the lane serves every group): their sum [t_bucket, D] instead,
           added by the worker in the same order.

Rows past t_real carry id -1 and weight 0 (nothing computed). Buckets keep shapes fixed so each
side can replay one CUDA graph per bucket.

Shape legend: T = tokens, Tb = bucket, D = hidden, K = expert slots per token.
"""

from __future__ import annotations

import torch

from actors.experts.carriers.base import StepHeader

HEADER_LEN = 16
OP_STEP, OP_CLOSE, OP_HELLO = 1, 2, 3
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MASK_AT, MASK_BITS = 11, 62
MAX_GROUPS = (HEADER_LEN - MASK_AT) * MASK_BITS


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


def header(op: int, step: StepHeader | None = None) -> list[int]:
    if step is None:
        return [op] + [0] * (HEADER_LEN - 1)
    tb2, t2 = (step.rows[1], step.counts[1]) if len(step.counts) > 1 else (0, 0)
    out = [op, step.epoch, step.n_layers, step.rows[0], step.counts[0], dtype_code(step.x_dtype), int(step.whole),
           step.d, step.k, tb2, t2]
    masks = [0] * (HEADER_LEN - MASK_AT)
    for g in step.groups:
        if g >= MAX_GROUPS:
            raise ValueError(f"the step lane names at most {MAX_GROUPS} groups")
        masks[g // MASK_BITS] |= 1 << (g % MASK_BITS)
    return out + masks


def parse_header(h: list[int]) -> tuple[int, StepHeader]:
    op, epoch, n_layers, tb, t, x_code, whole, d, k, tb2, t2 = h[:MASK_AT]
    groups = tuple(w * MASK_BITS + b for w, word in enumerate(h[MASK_AT:]) for b in range(MASK_BITS) if word >> b & 1)
    counts, rows = ((t, t2), (tb, tb2)) if tb2 > 0 else ((t,), (tb,))
    return op, StepHeader(epoch, n_layers, counts, rows, DTYPES[x_code], d, k, groups, bool(whole))


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
