"""The ops of `engine.batch_invariant`: each row of a step gets the same bits whatever the batch
size, its position in the batch, the other rows, and whether its prefix came from the cache or a
chunked prefill (docs/architecture.md, invariant 7).

Shape legend: T = tokens, K / N = a matmul's input / output width, H / Hkv = query / KV heads,
G = H / Hkv, Dh = head dim, BS = KV block size, R = rows of a row block, C = keys of a key chunk.

What varies per row in the default path, and what runs here instead (measured on this project's CPU
and torch, tests/unit/test_batch_invariant.py keeps measuring it):

  matmul      CPU BLAS: one row alone takes a GEMV path, more rows are cut into register tiles
              whose reduction differs by the row count (row 0 of F.linear gave three different
              results for M = 1, 2..8 and 9+). Here the rows go in zero-padded blocks of ROWS, one
              bmm of identical [ROWS, K] x [K, N] problems: every row is reduced by a call of the
              same shape, and its position inside a block changes nothing. CUDA with Triton:
              kernels/invariant_matmul.py (one tile config per (N, K), no split-K chosen by M).
  attention   torch's SDPA picks kernels and key blocks by the padded shapes of the step. Here a
              query's keys go in fixed chunks of C from key 0 (C from the block size only), each a
              bmm of [R, Dh] x [Dh, C] over rows of R = tokens x heads of one sequence, merged
              chunk by chunk in ascending order (online softmax; a chunk with nothing visible is an
              exact no-op). Decode and prefill rows run the same code. CUDA with Triton: the varlen
              paged kernel with one launch config per engine (`attention_config`).
  silu        torch's CPU kernels compute a tensor's vector body and its scalar tail with different
  sigmoid     code (F.silu of a slice differed from the same elements inside a longer tensor), so
              a row's bits depended on where the batch ends: x / (1 + exp(-x)) here.
  unchanged   row reductions (RMSNorm, router softmax and top-k, log_softmax) are row-local in
              torch below 32,768 elements a row (above, one row is split across threads; no
              hidden size comes near), elementwise ops, the Triton norm / RoPE / routing / SiLU /
              combine kernels (one program per row), sampling (counter-based per request).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.model import kernels

ROWS = 16  # rows per block of a torch matmul
KEY_CHUNK = 64  # keys per chunk of the torch attention (rounded up to whole KV blocks)
KEYS_PER_SPLIT = 256  # fewest keys per KV split of the Triton paged attention
MAX_SPLITS = 8  # most KV splits of a context (bounds the split partials of a long prefill)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with one reduction order per output element, whatever the number of rows."""
    if kernels.fused(x):
        from actors.model.kernels.invariant_matmul import linear as triton_linear

        return triton_linear(x, weight, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    m, n = rows.shape[0], weight.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    blocks = -(-m // ROWS)
    rows = F.pad(rows, (0, 0, 0, blocks * ROWS - m)).view(blocks, ROWS, k)
    out = torch.bmm(rows, weight.t().unsqueeze(0).expand(blocks, k, n)).view(-1, n)[:m]
    if bias is not None:
        out = out + bias
    return out.view(*lead, n)


def silu(x: torch.Tensor) -> torch.Tensor:
    """silu in float32, rounded to x.dtype (the rounding of F.silu and of the Triton kernels)."""
    xf = x.float()
    return (xf / (1.0 + torch.exp(-xf))).to(x.dtype)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (1.0 / (1.0 + torch.exp(-xf))).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if kernels.fused(gate):
        from actors.model.kernels.activation import silu_mul as triton_silu_mul

        return triton_silu_mul(gate, up)
    return silu(gate) * up


def grouped_swiglu(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Routed experts on the torch path: xs [A, D] sorted by expert, counts[e] rows of expert e
    (w13 [E, 2I, D] gate rows then up, w2 [E, D, I]) -> [A, D]. Each expert's rows in blocks of
    ROWS, one bmm over every block with its expert's weights: the linear above, for all experts."""
    a, d = xs.shape
    per_expert = [-(-c // ROWS) for c in counts]
    blocks = sum(per_expert)
    if blocks == 0:
        return xs.new_zeros(a, w2.shape[1])
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(per_expert))  # [NBLK]
    slot = torch.cat([torch.arange(c) for c in counts])  # row of each xs row inside its expert's blocks
    first = torch.tensor([0] + per_expert).cumsum(0)[:-1]  # first block of each expert
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    where = (first[owner] * ROWS + slot).to(xs.device)  # padded row of each xs row
    padded = xs.new_zeros(blocks * ROWS, d)
    padded[where] = xs
    experts = experts.to(xs.device)
    h = torch.bmm(padded.view(blocks, ROWS, d), w13[experts].transpose(1, 2))  # [NBLK, R, 2I]
    gate, up = h.chunk(2, dim=-1)
    act = silu(gate) * up
    return torch.bmm(act, w2[experts].transpose(1, 2)).reshape(blocks * ROWS, -1)[where]


# ---- one matmul for projections of the same input ----------------------------------------------------


def fuse_projections(model: torch.nn.Module) -> None:
    """q/k/v of every attention and gate/up of every SwiGLU as one matmul each (fewer, wider
    launches: a k or v projection alone is too narrow to fill a GPU). The parameters become views of
    the joined weight, so no second copy is kept and the default path reads the same tensors.
    Idempotent; modules whose projections are not plain float linears are left alone."""
    for module in model.modules():
        names = {"fused_qkv": ("q_proj", "k_proj", "v_proj"), "fused_gate_up": ("gate_proj", "up_proj")}
        for attr, parts in names.items():
            linears = [getattr(module, n, None) for n in parts]
            if hasattr(module, attr) or not all(_plain(lin) for lin in linears):
                continue
            if len({lin.bias is None for lin in linears}) != 1 or len({lin.weight.shape[1] for lin in linears}) != 1:
                continue
            module.__dict__[attr] = _join(linears)


def _plain(lin) -> bool:
    w = getattr(lin, "weight", None)
    return isinstance(w, torch.nn.Parameter) and w.dtype.is_floating_point and w.dim() == 2


def _join(linears) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        sizes, start = [], 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = weight[start : start + n]
            if bias is not None:
                lin.bias.data = bias[start : start + n]
            sizes.append(n)
            start += n
    return weight, bias, sizes


def fused_linear(x: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor | None, list[int]]) -> list[torch.Tensor]:
    """The outputs of the joined projections, as column views of one matmul's result."""
    weight, bias, sizes = fused
    return list(linear(x, weight, bias).split(sizes, dim=-1))


# ---- attention -------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch, scale: float,
              max_context: int) -> torch.Tensor:
    """q [T, H, Dh] (RoPE applied, this step's K/V already in the cache) -> [T, H, Dh]: every new
    token against keys 0..its position of its own sequence, each row computed the same way whether
    it is a decode token or part of a (chunked) prefill. max_context: the engine's bound on a
    context (kv.max_seq_len), which fixes the KV splits once per engine."""
    if kernels.fused(q) and kernels.power_of_two(q.shape[-1]):
        from actors.model.kernels.paged_attention import varlen_paged_attention

        cfg = attention_config(q, k_cache, max_context)
        return varlen_paged_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start,
                                      batch.context_lens, scale, max_context, config=cfg)
    return _attention_torch(q, k_cache, v_cache, batch, scale)


def attention_config(q: torch.Tensor, k_cache: torch.Tensor, max_context: int):
    """The varlen kernel's invariant launch: one tile shape, one split size and one split count for
    every launch of this engine (its own `batch_invariant` policy), with the split size chosen so a
    context splits at most MAX_SPLITS ways: the float32 partials of a launch are tokens x heads x
    splits x head dim, which a 4,096-token prefill could not afford at 256 keys a split and a long
    context."""
    from actors.model.kernels.paged_attention import AttentionPolicy

    import triton

    keys = max(KEYS_PER_SPLIT, -(-max_context // MAX_SPLITS))
    keys = -(-keys // 64) * 64  # whole key tiles
    policy = AttentionPolicy(split_keys=keys, max_splits=MAX_SPLITS, batch_invariant=True)
    group_pad = triton.next_power_of_2(q.shape[1] // k_cache.shape[2])
    return policy.config(q.shape[0], group_pad, max_context, q.dtype)


def _seq_of_token(batch) -> torch.Tensor:
    token = torch.arange(batch.num_tokens, device=batch.positions.device)
    return torch.searchsorted(batch.query_start[1:], token, right=True)


def _attention_torch(q, k_cache, v_cache, batch, scale: float) -> torch.Tensor:
    t, heads, dh = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    g = heads // kv_heads
    out = torch.empty_like(q)
    if t == 0:
        return out
    device = q.device
    # Row blocks: tb consecutive new tokens of one sequence x the G query heads of a KV head.
    tb = max(1, ROWS // g)
    r = tb * g
    counts = batch.query_start[1:] - batch.query_start[:-1]  # [B]
    nblk = (counts + tb - 1) // tb
    first_blk = torch.cumsum(nblk, 0) - nblk
    seq = _seq_of_token(batch)
    in_seq = torch.arange(t, device=device) - batch.query_start[seq]
    blk, slot = first_blk[seq] + in_seq // tb, in_seq % tb
    n_blocks = int(nblk.sum())
    seq_of_blk = torch.repeat_interleave(torch.arange(batch.num_seqs, device=device), nblk)

    qb = q.new_zeros(n_blocks, tb, heads, dh, dtype=torch.float32)
    qb[blk, slot] = q.float()
    qb = qb.view(n_blocks, tb, kv_heads, g, dh).permute(0, 2, 1, 3, 4).reshape(n_blocks * kv_heads, r, dh)
    pos = torch.zeros(n_blocks, tb, dtype=torch.long, device=device)  # padding rows see key 0 only
    pos[blk, slot] = batch.positions
    pos = pos.view(n_blocks, 1, tb, 1).expand(n_blocks, kv_heads, tb, g).reshape(n_blocks * kv_heads, r, 1)

    per_chunk = -(-KEY_CHUNK // bs)  # KV blocks per key chunk
    chunk = per_chunk * bs
    tables = batch.block_tables[seq_of_blk]  # [NBLK, M]
    width = tables.shape[1]
    n_chunks = -(-width // per_chunk)
    tables = F.pad(tables, (0, n_chunks * per_chunk - width))  # block 0: masked by position
    m = torch.full((n_blocks * kv_heads, r, 1), float("-inf"), device=device)
    acc = torch.zeros((n_blocks * kv_heads, r, dh + 1), device=device)  # [.., Dh values | denominator]
    ones = torch.ones((n_blocks, chunk, kv_heads, 1), device=device)
    for c in range(n_chunks):
        cols = tables[:, c * per_chunk : (c + 1) * per_chunk]
        keys = k_cache[cols].reshape(n_blocks, chunk, kv_heads, dh).float()
        vals = torch.cat([v_cache[cols].reshape(n_blocks, chunk, kv_heads, dh).float(), ones], dim=-1)
        keys = keys.permute(0, 2, 3, 1).reshape(n_blocks * kv_heads, dh, chunk)
        vals = vals.permute(0, 2, 1, 3).reshape(n_blocks * kv_heads, chunk, dh + 1)
        s = torch.bmm(qb, keys) * scale  # [NBLK*Hkv, R, C]
        key = torch.arange(c * chunk, (c + 1) * chunk, device=device)
        s = s.masked_fill(key.view(1, 1, -1) > pos, float("-inf"))
        m_c = s.amax(dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(m_c == float("-inf"), 0.0, m_c))
        part = torch.bmm(p, vals)  # [NBLK*Hkv, R, Dh + 1]
        m_new = torch.maximum(m, m_c)
        safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * torch.exp(m - safe) + part * torch.exp(m_c - safe)
        m = m_new
    res = (acc[..., :dh] / acc[..., dh:]).view(n_blocks, kv_heads, tb, g, dh).permute(0, 2, 1, 3, 4)
    return res.reshape(n_blocks, tb, heads, dh)[blk, slot].to(q.dtype)
