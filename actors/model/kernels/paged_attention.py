"""Varlen paged attention: every new token of a step (decode tokens and prefill chunks alike)
against its sequence's cached context, in one launch, reading the block table on the device.

Shape legend: T = new tokens of the step, B = sequences, H / Hkv = query / KV heads, G = H / Hkv
query heads per KV head (G_PAD: next power of two), Dh = head dim, NB = cache blocks, BS = block
size, M = block-table width, BQ = query tokens per program, N = keys per tile, P = KV splits.

Work decomposition. One program per (query block, KV head[, KV split]). A query block is BQ
consecutive new tokens of one sequence, and its tile holds BQ x G_PAD rows: every query head that
shares the KV head, for every token, so each key/value tile is read once for all of them (GQA
grouping). A program finds its sequence itself by a
binary search over query_start: sequence s owns blocks [qs[s] // BQ + s, qs[s + 1] // BQ + s + 1),
so the grid T // BQ + B is an upper bound fixed by the shapes alone; programs past their sequence's
tokens exit. Nothing here reads a device value on the host, so the launch is CUDA-graph safe with
its metadata (query_start, context_lens, block_tables) in static buffers.

Causality. A sequence with n new tokens and context c (keys in the cache after this step, its own
new K/V included) has its tokens at positions c - n .. c - 1; key j is visible to a token at
position p iff j <= p. A decode token is the case n = 1; a chunked prefill is any n with earlier
chunks already in the cache. Rows with no visible key (a padding sequence's tokens at negative
positions, see actors/engine/graphs/step_graphs.py) come out as zeros, never NaN.

KV splits (flash-decoding). With SPLITS > 1 a program takes only keys [s * split_keys,
(s + 1) * split_keys) of its block's causal range (the last split also everything past
SPLITS * split_keys), writes an unnormalised partial and its (max, sum), and a second launch
merges the splits in index order. The split boundaries depend on split_keys alone, never on the
batch, so with one split_keys and one SPLITS for every launch a token's result is a function of
its own context only, whether decoded, prefilled or chunk-prefilled (issue 19: batch invariance;
`AttentionPolicy.batch_invariant`). The default policy splits only small launches, where few
programs would otherwise leave the SMs idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _find_block(qstart_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """-> (sequence, first token, end token) of query block `pid`; first >= end: nothing to do."""
    lo = pid * 0
    hi = lo + num_seqs
    for _ in tl.static_range(SEARCH_STEPS):  # largest s with qs[s] // BQ + s <= pid
        mid = (lo + hi) // 2
        base = tl.load(qstart_ptr + mid) // BLOCK_Q + mid
        ok = base <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    q0 = tl.load(qstart_ptr + lo)
    q1 = tl.load(qstart_ptr + lo + 1)
    first = q0 + (pid - (q0 // BLOCK_Q + lo)) * BLOCK_Q
    return lo, q0, first, q1


@triton.jit
def _varlen_paged_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, qstart_ptr, ctx_ptr, out_ptr, part_ptr, stat_ptr,
    scale_log2, num_seqs, split_keys,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ot, stride_oh,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, SPLITS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq, q0, first, q1 = _find_block(qstart_ptr, pid, num_seqs, BLOCK_Q, SEARCH_STEPS)
    if first >= q1:
        return
    seq64 = seq.to(tl.int64)
    ctx = tl.load(ctx_ptr + seq)
    start_pos = ctx - (q1 - q0)  # position of the sequence's first new token
    rows = tl.arange(0, BLOCK_Q * G_PAD)
    tok = first + rows // G_PAD
    g = rows % G_PAD
    row_ok = (tok < q1) & (g < G)
    pos = start_pos + (tok - q0)
    head = kvh * G + g
    d = tl.arange(0, HEAD_DIM)
    tok64 = tok.to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    # keys [lo, hi) of this program: the block's causal range, cut to the split
    kv_hi = start_pos + (tl.minimum(first + BLOCK_Q, q1) - q0)  # last token's position + 1
    if SPLITS == 1:
        lo = kv_hi * 0
        hi = kv_hi
    else:
        lo = split * split_keys
        if lo >= kv_hi:
            return  # the merge reads only the splits that hold keys
        hi = tl.where(split == SPLITS - 1, kv_hi, tl.minimum(lo + split_keys, kv_hi))

    m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, HEAD_DIM], tl.float32)
    n = tl.arange(0, TILE_N)
    for start in range(lo, hi, TILE_N):
        key = start + n
        key_ok = key < hi
        block = tl.load(table_ptr + seq64 * stride_tb + key // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        off = block * stride_cb + (key % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache_ptr + off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = key_ok[None, :] & (key[None, :] <= pos[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))  # [rows, N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLITS == 1:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:  # partial [T, H, P, Dh] (unnormalised), stats [T, H, P, 2] = (max in log2 units, sum)
        prow = (tok64 * H + head) * SPLITS + split
        tl.store(part_ptr + prow[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(stat_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(stat_ptr + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    qstart_ptr, ctx_ptr, part_ptr, stat_ptr, out_ptr, num_seqs, split_keys, stride_ot, stride_oh,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, SPLITS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """Same grid as the attention launch (without the split axis): the splits that held keys for
    this query block, combined in index order."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, q0, first, q1 = _find_block(qstart_ptr, pid, num_seqs, BLOCK_Q, SEARCH_STEPS)
    if first >= q1:
        return
    ctx = tl.load(ctx_ptr + seq)
    kv_hi = ctx - (q1 - q0) + (tl.minimum(first + BLOCK_Q, q1) - q0)
    used = tl.minimum(tl.cdiv(kv_hi, split_keys), SPLITS)
    rows = tl.arange(0, BLOCK_Q * G_PAD)
    tok = first + rows // G_PAD
    g = rows % G_PAD
    row_ok = (tok < q1) & (g < G)
    head = kvh * G + g
    d = tl.arange(0, HEAD_DIM)
    tok64 = tok.to(tl.int64)
    base = (tok64 * H + head) * SPLITS
    m_all = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, HEAD_DIM], tl.float32)
    for s in range(0, used):
        m_s = tl.load(stat_ptr + (base + s) * 2, mask=row_ok, other=float("-inf"))
        l_s = tl.load(stat_ptr + (base + s) * 2 + 1, mask=row_ok, other=0.0)
        a_s = tl.load(part_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_all, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m_all - m_safe)
        w_s = tl.exp2(m_s - m_safe)
        acc = acc * w_old[:, None] + tl.where(w_s[:, None] > 0, a_s * w_s[:, None], 0.0)
        l_all = l_all * w_old + l_s * w_s
        m_all = m_new
    out = tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per program: BQ tokens x G_PAD heads
    tile_n: int  # keys per tile
    splits: int  # KV splits (1 = none)
    split_keys: int  # keys per split (a multiple of tile_n)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionPolicy:
    """How launches are shaped. The default picks tiles by the launch's token count and splits only
    small launches; `batch_invariant` fixes every choice (tiles, split size, split count) for every
    launch, so a token's arithmetic never depends on what else is in the step (issue 19)."""

    split_keys: int = 256  # keys per KV split
    max_splits: int = 32  # split programs per query block at most (the last takes the rest)
    split_below_tokens: int = 64  # launches with at most this many tokens split the KV
    batch_invariant: bool = False

    def config(self, tokens: int, group_pad: int, max_context: int, dtype: torch.dtype) -> LaunchConfig:
        if self.batch_invariant:
            splits = min(self.max_splits, max(1, -(-max_context // self.split_keys)))
            return LaunchConfig(max(64, group_pad), 64, splits, self.split_keys, 4, 2)
        split_keys, max_splits = self.split_keys, self.max_splits
        if tokens <= 8:  # a few decodes: short splits keep the SMs busy (H200: 1 x 1,024 keys)
            split_keys, max_splits = 64, 2 * self.max_splits
        splits = min(max_splits, max(1, -(-max_context // split_keys))) if tokens <= self.split_below_tokens else 1
        if tokens <= 256:  # decode-sized: a small tile wastes little on one-token queries
            return LaunchConfig(max(16, group_pad), 64, splits, split_keys, 4, 2)
        if tokens < 4096 or dtype == torch.float32:
            # decodes next to prompt chunks: 64-row tiles (a decode's one token fills few rows)
            return LaunchConfig(max(64, group_pad), 64, 1, split_keys, 4, 2)
        return LaunchConfig(max(128, group_pad), 64, 1, split_keys, 8, 2)  # prompt-heavy: taller tiles


POLICY = AttentionPolicy()


def set_policy(policy: AttentionPolicy) -> None:
    """Before any CUDA-graph capture: the captured launches keep the shapes chosen then."""
    global POLICY
    POLICY = policy


def varlen_paged_attention(
    q: torch.Tensor,  # [T, H, Dh], RoPE applied
    k_cache: torch.Tensor,  # [NB, BS, Hkv, Dh], this step's K/V already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int
    query_start: torch.Tensor,  # [B + 1] int, cumulative new tokens; query_start[B] <= T
    context_lens: torch.Tensor,  # [B] int, keys of each sequence after this step
    scale: float,
    max_context: int,  # bound on any context length (sizes the split axis)
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """-> [T, H, Dh] in q.dtype. Tokens past query_start[B] belong to no sequence: left unwritten."""
    t, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    b = context_lens.shape[0]
    if t == 0 or b == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    cfg = config or POLICY.config(t, group_pad, max_context, q.dtype)
    block_q = cfg.block_m // group_pad
    grid = (t // block_q + b, kv_heads)
    steps = max(1, math.ceil(math.log2(b + 1)))
    part = stat = out  # unused with one split
    if cfg.splits > 1:
        part = torch.empty((t, heads, cfg.splits, head_dim), dtype=torch.float32, device=q.device)
        stat = torch.empty((t, heads, cfg.splits, 2), dtype=torch.float32, device=q.device)
    _varlen_paged_kernel[(*grid, cfg.splits)](
        q, k_cache, v_cache, block_tables, query_start, context_lens, out, part, stat,
        scale * LOG2E, b, cfg.split_keys,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        H=heads, G=group, G_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, TILE_N=cfg.tile_n, SPLITS=cfg.splits, SEARCH_STEPS=steps,
        IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.splits > 1:
        _merge_splits_kernel[grid](
            query_start, context_lens, part, stat, out, b, cfg.split_keys, out.stride(0), out.stride(1),
            H=heads, G=group, G_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_Q=block_q, SPLITS=cfg.splits,
            SEARCH_STEPS=steps, num_warps=4,
        )
    return out
