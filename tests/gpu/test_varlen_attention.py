"""The varlen paged attention kernel (actors/model/kernels/paged_attention.py) against a float64
reference computed straight from the paged cache, on fresh random inputs: decode rows and
(chunked) prefill rows mixed in one launch, random block tables, every launch shape the policy
picks (small / tall tiles, KV splits with the last split taking the rest), a padding sequence whose
rows see no key. Runs on CUDA, or on a CPU through Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_varlen_attention.py   # CPU: pip install triton "numpy<2.4"
    python -m pytest -q tests/gpu/test_varlen_attention.py                      # CUDA
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.gpu.test_kernels import DEVICE, DTYPES, pytestmark  # noqa: E402,F401 - the same device and skip rules


def reference(q, k_cache, v_cache, tables, query_start, context, scale):
    """float64, token by token: keys 0..position through the block table; no key -> zeros."""
    t, heads, dh = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.zeros(t, heads, dh, dtype=torch.float64)
    qs, ctx = query_start.tolist(), context.tolist()
    kc, vc = k_cache.double().cpu(), v_cache.double().cpu()
    for s in range(len(ctx)):
        n = qs[s + 1] - qs[s]
        for i in range(n):
            pos = ctx[s] - n + i
            if pos < 0:
                continue
            keys = torch.arange(pos + 1)
            blocks = tables[s].cpu()[keys // bs]
            k = kc[blocks, keys % bs]  # [L, Hkv, Dh]
            v = vc[blocks, keys % bs]
            qi = q[qs[s] + i].double().cpu()  # [H, Dh]
            kh = k.repeat_interleave(group, dim=1)  # [L, H, Dh]
            vh = v.repeat_interleave(group, dim=1)
            w = torch.softmax(torch.einsum("hd,lhd->hl", qi, kh) * scale, dim=-1)
            out[qs[s] + i] = torch.einsum("hl,lhd->hd", w, vh)
    return out


def case(rows, block_size, heads, kv_heads, dh, dtype, seed, pad_tokens=0):
    """rows: [(new tokens, context after the step)]; pad_tokens: a trailing padding sequence with
    that many tokens and context 1 (its last token sees key 0, the others nothing)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if pad_tokens:
        rows = rows + [(pad_tokens, 1)]
    counts = [n for n, _ in rows]
    ctx = [c for _, c in rows]
    b = len(rows)
    width = max(-(-c // block_size) for c in ctx) + 1
    nb = b * width + 5
    k_cache = torch.randn(nb, block_size, kv_heads, dh, device=DEVICE, generator=g).to(dtype)
    v_cache = torch.randn(nb, block_size, kv_heads, dh, device=DEVICE, generator=g).to(dtype)
    tables = torch.randperm(nb, device=DEVICE, generator=g)[: b * width].view(b, width)
    query_start = torch.tensor([0] + counts, device=DEVICE).cumsum(0)
    t = int(query_start[-1])
    q = torch.randn(t, heads, dh, device=DEVICE, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, query_start, torch.tensor(ctx, device=DEVICE)


def check(got, want, dtype):
    err = (got.double().cpu() - want).norm() / want.norm()
    assert torch.isfinite(got).all()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), float(err)


# decode rows, prefill from scratch, chunks after cached context, one-token prompts, long contexts
MIXED = [(1, 1), (1, 37), (19, 19), (1, 70), (33, 80), (5, 5), (1, 129), (64, 200), (2, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, heads, kv_heads, dh", [(16, 8, 2, 32), (4, 4, 4, 16), (8, 32, 4, 64)])
def test_mixed_step_matches_float64_reference(dtype, block_size, heads, kv_heads, dh):
    from actors.model.kernels.paged_attention import varlen_paged_attention

    q, kc, vc, tables, qs, ctx = case(MIXED, block_size, heads, kv_heads, dh, dtype, seed=block_size + dh)
    got = varlen_paged_attention(q, kc, vc, tables, qs, ctx, dh**-0.5, max_context=256)
    check(got, reference(q, kc, vc, tables, qs, ctx, dh**-0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m, tile_n, splits, split_keys", [
    (16, 16, 1, 64), (64, 32, 1, 64), (32, 16, 3, 32), (16, 64, 4, 64), (64, 16, 2, 16),
])
def test_every_launch_shape_computes_the_same_function(dtype, block_m, tile_n, splits, split_keys):
    """Tiles, splits (contexts longer than splits x split_keys: the last split takes the rest) and a
    padding sequence of 7 tokens, of which only the last sees a key."""
    from actors.model.kernels.paged_attention import LaunchConfig, varlen_paged_attention

    rows = [(1, 3), (9, 150), (1, 64), (24, 24), (3, 40)]
    q, kc, vc, tables, qs, ctx = case(rows, 8, 8, 2, 32, dtype, seed=block_m * splits + tile_n, pad_tokens=7)
    cfg = LaunchConfig(block_m, tile_n, splits, split_keys, 4, 1)
    got = varlen_paged_attention(q, kc, vc, tables, qs, ctx, 0.3, max_context=256, config=cfg)
    want = reference(q, kc, vc, tables, qs, ctx, 0.3)
    check(got, want, dtype)
    assert (got[-7:-1] == 0).all()  # padding rows with no visible key


def test_decode_only_and_prefill_only_launches():
    from actors.model.kernels.paged_attention import varlen_paged_attention

    dtype = DTYPES[-1]
    for rows in ([(1, c) for c in (1, 17, 64, 65, 300, 2)], [(40, 40), (70, 90)]):
        q, kc, vc, tables, qs, ctx = case(rows, 16, 16, 2, 32, dtype, seed=len(rows))
        got = varlen_paged_attention(q, kc, vc, tables, qs, ctx, 0.2, max_context=512)
        check(got, reference(q, kc, vc, tables, qs, ctx, 0.2), dtype)


def test_a_token_gets_the_same_bits_alone_or_in_a_batch_under_the_invariant_policy():
    """batch_invariant: the same position gives the same result whether decoded alone, decoded next
    to others or computed as the last token of a prefill chunk (issue 19 relies on this)."""
    from actors.model.kernels import paged_attention as pa

    dtype = DTYPES[-1]
    policy = pa.AttentionPolicy(split_keys=32, max_splits=4, batch_invariant=True)
    q, kc, vc, tables, qs, ctx = case([(12, 100), (1, 45), (1, 7)], 8, 8, 2, 32, dtype, seed=11)
    cfg = policy.config(int(qs[-1]), 4, 256, dtype)
    mixed = pa.varlen_paged_attention(q, kc, vc, tables, qs, ctx, 0.25, 256, config=cfg)
    # sequence 0's last token (position 99) as a one-token decode, alone
    alone = pa.varlen_paged_attention(q[11:12].contiguous(), kc, vc, tables[:1], torch.tensor([0, 1], device=DEVICE),
                                      ctx[:1], 0.25, 256, config=policy.config(1, 4, 256, dtype))
    if DEVICE == "cuda":  # a matrix unit reduces every row alike; numpy's BLAS (the interpreter) may not
        assert torch.equal(alone[0], mixed[11])
    else:
        torch.testing.assert_close(alone[0], mixed[11], atol=1e-6, rtol=1e-6)
    # sequence 1's decode token in a batch of two vs alone
    alone1 = pa.varlen_paged_attention(q[12:13].contiguous(), kc, vc, tables[1:2], torch.tensor([0, 1], device=DEVICE),
                                       ctx[1:2], 0.25, 256, config=policy.config(1, 4, 256, dtype))
    assert torch.equal(alone1[0], mixed[12])
