"""Paged decode attention: one new query token per sequence against its whole cached context,
reading the block table on the device (no host work, fixed launch shape: CUDA-graph safe).

Shape legend: B = sequences, H / Hkv = query / KV heads, G = H / Hkv query heads per KV head,
Dh = head dim, NB = cache blocks, BS = block size, M = block-table width, N = keys per tile.

One program per (sequence, KV head, split) computes all G query heads that share the KV head (the
keys and values are read once for the group): keys are gathered N at a time through the block table,
scores q·k for the G heads come from one tensor-core dot, and an online softmax (running max and sum)
accumulates the values. With few sequences the context is cut into S splits run side by side
(flash-decoding) and a second launch merges their partial softmaxes; S depends on the batch size
only, so the launch shape stays fixed for a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, out_ptr, part_ptr, stat_ptr,
    scale,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * G + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    ctx = tl.load(ctx_ptr + tl.program_id(0))
    if SPLITS == 1:
        lo = 0
        hi = ctx
    else:  # split s takes keys [s * chunk, (s + 1) * chunk), chunk a whole number of tiles
        chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), TILE_N) * TILE_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, ctx)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
    n = tl.arange(0, TILE_N)
    for start in range(lo, hi, TILE_N):
        key = start + n
        valid = key < hi
        block = tl.load(table_ptr + seq * stride_tb + key // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_cb + (key % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [G_PAD, N]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=(g < G)[:, None],
        )
    else:  # partial [B, S, H, Dh] (unnormalised) and its (max, sum) [B, S, H, 2]; empty splits: -inf, 0
        row = (seq * SPLITS + split) * H + heads
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < G)[:, None])
        tl.store(stat_ptr + row * 2, m, mask=g < G)
        tl.store(stat_ptr + row * 2 + 1, denom, mask=g < G)


@triton.jit
def _merge_splits_kernel(
    part_ptr, stat_ptr, out_ptr, stride_ob, stride_oh,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * SPLITS + s) * H + head  # [S]
    m = tl.load(stat_ptr + row * 2)
    denom = tl.load(stat_ptr + row * 2 + 1)
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :])  # [S, Dh]
    top = tl.max(m, axis=0)  # split 0 always holds key 0: finite
    w = tl.exp(m - top)  # empty splits (-inf) weigh 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_splits(batch: int, kv_heads: int) -> int:
    """Splits per sequence so that about two programs per SM run when sequences are few."""
    programs = batch * kv_heads
    if programs >= 64:
        return 1
    return min(16, triton.next_power_of_2(max(1, 256 // programs)))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, Dh], RoPE applied
    k_cache: torch.Tensor,  # [NB, BS, Hkv, Dh]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int
    context_lens: torch.Tensor,  # [B] int, keys per sequence (>= 1)
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """-> [B, H, Dh] in q.dtype. splits: default num_splits(B, Hkv)."""
    b, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if b == 0:
        return out
    group = heads // kv_heads
    splits = num_splits(b, kv_heads) if splits is None else splits
    part = stat = out  # unused with one split
    if splits > 1:
        part = torch.empty((b, splits, heads, head_dim), dtype=torch.float32, device=q.device)
        stat = torch.empty((b, splits, heads, 2), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, stat,
        scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        H=heads, G=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=32, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    if splits > 1:
        _merge_splits_kernel[(b, heads)](
            part, stat, out, out.stride(0), out.stride(1), H=heads, HEAD_DIM=head_dim, SPLITS=splits, num_warps=4
        )
    return out


# ---- fixed keys per split (engine.batch_invariant) ---------------------------------------------------
# A row's keys are cut at multiples of KEYS_PER_SPLIT from key 0, whatever the batch: each split is
# its own online softmax over its keys, written as a partial when the row has more than one, and the
# merge adds the partials in ascending split order. So a row's bits follow from its own context
# alone, decoded or (chunk-)prefilled. How many programs share a row's splits (`programs`, from the
# batch) only changes who computes a split, never how.


@triton.jit(do_not_specialize=["programs"])
def _paged_fixed_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_ptr, out_ptr, part_ptr, stat_ptr,
    scale, programs, max_splits,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * G + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    ctx = tl.load(ctx_ptr + tl.program_id(0))
    n_splits = tl.cdiv(ctx, KEYS_PER_SPLIT)
    if (n_splits <= 0) & (tl.program_id(2) == 0):  # a row with no key (a padding row): zeros, never garbage
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 tl.zeros([G_PAD, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])
    n = tl.arange(0, TILE_N)
    for split in range(tl.program_id(2), n_splits, programs):
        lo = split * KEYS_PER_SPLIT
        hi = tl.minimum(lo + KEYS_PER_SPLIT, ctx)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        for start in range(lo, hi, TILE_N):
            key = start + n
            valid = key < hi
            block = tl.load(table_ptr + seq * stride_tb + key // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            row = block * stride_cb + (key % BLOCK_SIZE) * stride_cs + kvh * stride_ch
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))  # [G_PAD, N]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if n_splits == 1:
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])
        else:  # partial [rows, max_splits, H, Dh] and its (max, sum) [rows, max_splits, H, 2]
            prow = (seq * max_splits + split) * H + heads
            tl.store(part_ptr + prow[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < G)[:, None])
            tl.store(stat_ptr + prow * 2, m, mask=g < G)
            tl.store(stat_ptr + prow * 2 + 1, denom, mask=g < G)


@triton.jit
def _merge_fixed_splits_kernel(
    part_ptr, stat_ptr, ctx_ptr, out_ptr, max_splits, stride_ob, stride_oh,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    n_splits = tl.cdiv(tl.load(ctx_ptr + tl.program_id(0)), KEYS_PER_SPLIT)
    if n_splits > 1:  # one split: the attention kernel wrote the row itself
        d = tl.arange(0, HEAD_DIM)
        base = seq * max_splits * H + head
        top = tl.load(stat_ptr + base * 2)
        for s in range(1, n_splits):
            top = tl.maximum(top, tl.load(stat_ptr + (base + s * H) * 2))
        num = tl.zeros([HEAD_DIM], tl.float32)
        den = 0.0
        for s in range(0, n_splits):  # ascending split order, one at a time
            row = base + s * H
            m = tl.load(stat_ptr + row * 2)
            w = tl.where(m == top, 1.0, tl.exp(m - top))
            num += tl.load(part_ptr + row * HEAD_DIM + d) * w
            den += tl.load(stat_ptr + row * 2 + 1) * w
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, (num / den).to(out_ptr.dtype.element_ty))


PARTIAL_BYTES = 64 << 20  # split partials one launch may write; more rows go in several launches


def paged_attention_fixed_splits(
    q: torch.Tensor,  # [R, H, Dh]: one query token per row, RoPE applied
    k_cache: torch.Tensor,  # [NB, BS, Hkv, Dh]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [R, M] int: the row's sequence's blocks
    context_lens: torch.Tensor,  # [R] int: keys the row sees (its position + 1)
    scale: float,
    keys_per_split: int,
    programs: int | None = None,
) -> torch.Tensor:
    """-> [R, H, Dh] in q.dtype; a row's result depends on its own query and keys only.
    programs: programs per (row, KV head), default from the row count (any value, same bits)."""
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    tile = 32
    assert keys_per_split % tile == 0, "keys_per_split must be a multiple of the key tile"
    out = torch.empty_like(q)
    if rows == 0:
        return out
    max_splits = -(-(block_tables.shape[1] * block_size) // keys_per_split)  # from shapes: graph-safe
    per_row = max_splits * heads * (head_dim + 2) * 4 if max_splits > 1 else 0
    step = max(1, PARTIAL_BYTES // per_row) if per_row else rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        _fixed_split_launch(q[r0:r1], k_cache, v_cache, block_tables[r0:r1], context_lens[r0:r1], out[r0:r1],
                            scale, keys_per_split, max_splits, programs, tile)
    return out


def _fixed_split_launch(q, k_cache, v_cache, tables, ctx, out, scale, keys_per_split, max_splits, programs, tile):
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if programs is None:
        programs = min(max_splits, max(1, 256 // (rows * kv_heads)))
    part = stat = out  # unused when no row has two splits
    if max_splits > 1:
        part = torch.empty((rows, max_splits, heads, head_dim), dtype=torch.float32, device=q.device)
        stat = torch.empty((rows, max_splits, heads, 2), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    _paged_fixed_split_kernel[(rows, kv_heads, programs)](
        q, k_cache, v_cache, tables, ctx, out, part, stat,
        scale, programs, max_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0), out.stride(0), out.stride(1),
        H=heads, G=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=tile, KEYS_PER_SPLIT=keys_per_split, IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    if max_splits > 1:
        _merge_fixed_splits_kernel[(rows, heads)](
            part, stat, ctx, out, max_splits, out.stride(0), out.stride(1),
            H=heads, HEAD_DIM=head_dim, KEYS_PER_SPLIT=keys_per_split, num_warps=4,
        )
