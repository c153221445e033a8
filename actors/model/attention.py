"""Paged causal attention over a StepBatch: prefill chunks and decode tokens in one call.

Shape legend: T = new tokens of the step, B = sequences, Q = most new tokens of any sequence,
M = block-table width, BS = block size, L = M * BS keys per sequence (padded), H = query heads,
Hkv = KV heads, Dh = head dim.

The new tokens are scattered into a padded [B, Q] query layout, every sequence's keys are gathered
from its blocks, and one masked SDPA call does the lot. Key j is visible to a query at position p
iff j <= p: positions are cache indices, so this is both the causal mask and the context length.

On CUDA every step, decode tokens and prefill chunks alike, goes to the varlen paged attention
kernel (actors/model/kernels/paged_attention.py), which reads the block table on the device and
never gathers the KV into a dense copy: no host value is needed, so any step can be captured in a
CUDA graph. The padded SDPA path below is the CPU / NPU fallback (and the reference the kernel is
tested against); it asks the device for Q only when the host did not say (StepBatch.max_query).
With `engine.batch_invariant` both give way to kernels/invariant.py: one computation per row whose
result depends on the row's own context only (the same kernel with one fixed KV split size on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors.model import kernels
from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch


@dataclass
class AttentionPlan:
    """Index tensors derived once per step and shared by every layer."""

    seq_of_token: torch.Tensor  # [T] sequence of each new token
    row_of_token: torch.Tensor  # [T] its row in the padded [B, Q] layout
    max_query: int  # Q
    mask: torch.Tensor  # [B, 1, Q, L] bool, True = attend


def plan_attention(batch: StepBatch, block_size: int) -> AttentionPlan:
    device = batch.input_ids.device
    starts = batch.query_start
    num_seqs = batch.num_seqs
    token = torch.arange(batch.num_tokens, device=device)
    seq = torch.searchsorted(starts[1:], token, right=True)  # [T]
    row = token - starts[seq]
    if batch.max_query is not None:
        max_query = batch.max_query if num_seqs else 0
    elif batch.num_tokens == num_seqs:  # decode: Q = 1 without a device-to-host read
        max_query = 1 if num_seqs else 0
    else:
        max_query = int((starts[1:] - starts[:-1]).max().item()) if num_seqs else 0
    # Padded query rows get position 0: they see key 0 only (never an all-masked row, which SDPA
    # turns into NaN) and their outputs are dropped.
    qpos = torch.zeros(num_seqs, max_query, dtype=torch.long, device=device)
    qpos[seq, row] = batch.positions
    keys = torch.arange(batch.block_tables.shape[1] * block_size, device=device)  # [L]
    mask = keys.view(1, 1, -1) <= qpos.unsqueeze(-1)  # [B, Q, L]
    return AttentionPlan(seq, row, max_query, mask.unsqueeze(1))


def paged_attention(
    q: torch.Tensor,  # [T, H, Dh], RoPE applied
    layer: int,
    batch: StepBatch,
    kv: PagedKVCache,
    step,  # the model's per-step context: .plan (an AttentionPlan, built on first use)
    scale: float,
    fused: bool | None = None,
) -> torch.Tensor:
    """-> [T, H, Dh]: the new tokens (their K/V already in the cache) against their whole context.
    `fused`: the varlen paged-attention kernel (chosen by the model once; None: decided here)."""
    if kernels.batch_invariant():
        from actors.model.kernels import invariant

        return invariant.attention(q, kv.k[layer], kv.v[layer], batch, scale, kv.max_seq_len)
    num_seqs, heads, head_dim = batch.num_seqs, q.shape[1], q.shape[2]
    kv_heads = kv.k[layer].shape[2]
    if fused is None:
        fused = kernels.fused(q) and kernels.power_of_two(head_dim)
    if fused:
        from actors.model.kernels.paged_attention import varlen_paged_attention

        return varlen_paged_attention(q, kv.k[layer], kv.v[layer], batch.block_tables, batch.query_start,
                                      batch.context_lens, scale, kv.max_seq_len)
    plan: AttentionPlan = step.plan

    qp = q.new_zeros(num_seqs, plan.max_query, heads, head_dim)
    qp[plan.seq_of_token, plan.row_of_token] = q
    # [B, M, BS, Hkv, Dh] -> [B, L, Hkv, Dh]
    keys = kv.k[layer][batch.block_tables].flatten(1, 2).to(q.dtype)
    values = kv.v[layer][batch.block_tables].flatten(1, 2).to(q.dtype)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),  # [B, H, Q, Dh]
        keys.transpose(1, 2),  # [B, Hkv, L, Dh]
        values.transpose(1, 2),
        attn_mask=plan.mask,
        scale=scale,
        enable_gqa=kv_heads != heads,  # query head h reads KV head h // (H / Hkv), no copies
    )  # [B, H, Q, Dh]
    return out.transpose(1, 2)[plan.seq_of_token, plan.row_of_token]
