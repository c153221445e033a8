"""Ping-pong step runner: the step's sequences split into two micro-batches whose layers interleave
so that one half's attention runs while the other half's routed experts are away on the workers.

    layer l:  A: finish(l-1) attn(l) route dispatch(l)  |  B's experts (l-1 or l) in flight
              B: finish(l-1) attn(l) route dispatch(l)  |  A's experts (l) in flight

It drives a MoGEModel from outside (invariant 1) through its per-stage methods; the model runner
(actors/engine/model_runner.py) uses it in place of `model(batch, kv)`: same logits. Sequences are independent in attention and MoE, so
the split changes nothing but the order of work. Steps with one sequence run unsplit.

Shape legend: T = tokens, B = sequences, D = hidden, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch


def split_batch(batch: StepBatch, n_first: int) -> tuple[StepBatch, StepBatch]:
    """Sequences [0, n_first) and [n_first, B) as two StepBatches (token rows rebased)."""
    # a decode batch (one token per sequence) cuts at row n_first without reading the device
    # (no host sync: the split runs inside a captured CUDA graph too)
    cut = n_first if batch.num_tokens == batch.num_seqs else int(batch.query_start[n_first])
    first = StepBatch(
        input_ids=batch.input_ids[:cut],
        positions=batch.positions[:cut],
        query_start=batch.query_start[: n_first + 1],
        context_lens=batch.context_lens[:n_first],
        block_tables=batch.block_tables[:n_first],
        slot_mapping=batch.slot_mapping[:cut],
        logits_index=batch.logits_index[:n_first],
    )
    second = StepBatch(
        input_ids=batch.input_ids[cut:],
        positions=batch.positions[cut:],
        query_start=batch.query_start[n_first:] - cut,
        context_lens=batch.context_lens[n_first:],
        block_tables=batch.block_tables[n_first:],
        slot_mapping=batch.slot_mapping[cut:],
        logits_index=batch.logits_index[n_first:] - cut,
    )
    return first, second


def balanced_cut(batch: StepBatch) -> int:
    """Sequences in the first micro-batch so both halves carry about the same number of tokens."""
    if batch.num_tokens == batch.num_seqs:  # decode: the same cut as below, without a host sync
        return decode_cut(batch.num_seqs)
    starts = batch.query_start[1:-1].tolist()  # tokens before sequence 1..B-1
    half = batch.num_tokens / 2
    cut = next((i + 1 for i, s in enumerate(starts) if s >= half), batch.num_seqs - 1)
    return min(max(cut, 1), batch.num_seqs - 1)


def decode_cut(b: int) -> int:
    """balanced_cut of a decode batch of b >= 2 sequences."""
    return min(max((b + 1) // 2, 1), b - 1)


def micro_batch_tokens(b: int) -> list[int]:
    """Token counts of the micro-batches PingPongRunner makes of a decode batch of b sequences."""
    return [b] if b < 2 else [decode_cut(b), b - decode_cut(b)]


@dataclass
class _MicroBatch:
    batch: StepBatch
    h: torch.Tensor  # [T_mb, D]
    x: torch.Tensor | None = None  # post-attention normed activations of the layer in flight
    pending: object | None = None  # PendingExperts of the layer in flight
    layer: int = -1


class PingPongRunner:
    """Runs a step of `model` as two interleaved micro-batches (same logits as `model(batch, kv)`)."""

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def forward(self, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        if batch.num_seqs < 2:
            return self.model(batch, kv)
        m = self.model
        parts = split_batch(batch, balanced_cut(batch))
        m.experts.begin_step([p.num_tokens for p in parts])  # the step lane: both over one lane, in this order
        halves = [_MicroBatch(b, m.embed(b.input_ids)) for b in parts]
        for layer in range(m.cfg.num_layers):
            for mb in halves:
                self._finish(mb)
                mb.h, mb.x = m.attention_block(layer, mb.h, mb.batch, kv)
                ids, weights = m.route(layer, mb.x)
                mb.layer = layer
                mb.pending = None if ids is None else m.experts.dispatch(layer, mb.x, ids, weights)
        for mb in halves:
            self._finish(mb)
        return torch.cat([m.head(mb.h, mb.batch.logits_index) for mb in halves])  # [B, V]

    def _finish(self, mb: _MicroBatch) -> None:
        if mb.layer < 0:
            return
        routed = None if mb.pending is None else mb.pending.wait()
        mb.h = self.model.finish_moe(mb.layer, mb.h, mb.x, routed)
        mb.layer, mb.pending, mb.x = -1, None, None
