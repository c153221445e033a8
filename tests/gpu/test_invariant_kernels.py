"""The kernels of `engine.batch_invariant` (actors/model/kernels/invariant_matmul.py, the fixed-split
paged attention in kernels/paged_decode.py): right against float64 torch, and each row the same bits
whatever the other rows — its number, order and grouping.

    python -m pytest -q tests/gpu/test_invariant_kernels.py                        # CUDA: the real MMAs
    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_invariant_kernels.py     # CPU: the kernels' logic

On the interpreter tl.dot is numpy's matmul, whose BLAS rounds a row by its position in the tile; the
tests swap in a dot that reduces every element in one fixed order (what a tensor-core MMA does per
row), so what they check there is the kernels' own indexing, masking and split order. On CUDA they
check the hardware too. Skips without triton (CI) and on a CPU without the interpreter.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA, or TRITON_INTERPRET=1 for Triton's CPU interpreter"),
]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


@pytest.fixture(autouse=True, scope="module")
def fused_everywhere():
    """The Triton paths on CPU tensors too (interpreter), with a row-independent dot there."""
    from actors.model import kernels

    kernels.set_enabled(True, on_cpu=DEVICE == "cpu")
    patched = None
    if DEVICE == "cpu":
        from triton.runtime import interpreter

        patched = interpreter.InterpreterBuilder.create_dot

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            out = np.einsum("ik,kj->ij", a.data.astype(np.float32), b.data.astype(np.float32))
            return interpreter.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)

        interpreter.InterpreterBuilder.create_dot = create_dot
    yield
    kernels.set_enabled(True)
    if patched is not None:
        from triton.runtime import interpreter

        interpreter.InterpreterBuilder.create_dot = patched


def tol(dtype):
    return dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, splits", [(48, 64, 1), (80, 200, 1), (80, 200, 4)])
def test_linear_rows_do_not_depend_on_the_batch(dtype, n, k, splits):
    from actors.model.kernels.invariant_matmul import Config, config, linear

    g = gen(n + k + splits)
    w, b = randn(n, k, g=g, dtype=dtype, scale=k**-0.5), randn(n, g=g, dtype=dtype)
    x = randn(70, k, g=g, dtype=dtype)
    cfg = config(n, k, dtype)
    if splits > 1:  # the split-K path at a small size: 3 splits of 64 (the last one short)
        cfg = Config(cfg.block_m, cfg.block_n, 32, 64, splits)
    y = linear(x, w, b, cfg)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), ref, **tol(dtype))
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(linear(x[perm], w, b, cfg), y[perm])  # any order
    for lo, hi in ((0, 1), (3, 4), (5, 9), (1, 66)):  # any count, any position
        assert torch.equal(linear(x[lo:hi], w, b, cfg), y[lo:hi]), (lo, hi)


def test_configs_depend_on_the_shape_of_the_weight_only():
    """One config per (N, K): split K where a big weight would otherwise run on few programs."""
    from actors.model.kernels.invariant_matmul import config

    assert config(2048, 4096, torch.bfloat16).splits == 2  # o_proj of the 12-layer shapes
    assert config(5120, 2048, torch.bfloat16).splits == 1  # 160 tiles already
    assert config(64, 2048, torch.bfloat16).splits == 1  # a router: too small to be worth a launch
    assert config(151936, 2048, torch.bfloat16).block_n == 128


def moe_reference(x, w13, w2, ids, weights, n_local):
    """Per token Σ weight · expert(x) in float64, experts outside [0, n_local) skipped."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    xd = x.double()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < n_local:
                gate, up = (w13[e].double() @ xd[t]).chunk(2)
                out[t] += float(weights[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_moe_is_the_same_under_any_token_grouping(dtype):
    """The invariant fused_moe: right, and a token's output identical alone, in a permuted batch,
    and whether its groups are computed stacked or one call per group."""
    from actors.model import kernels
    from actors.model.kernels.moe import fused_moe

    g = gen(3)
    n_groups, eg, d, inner, k, t = 4, 4, 64, 48, 4, 37
    e = n_groups * eg
    w13 = randn(e, 2 * inner, d, g=g, dtype=dtype, scale=d**-0.5)
    w2 = randn(e, d, inner, g=g, dtype=dtype, scale=inner**-0.5)
    x = randn(t, d, g=g, dtype=dtype)
    ids = torch.stack([torch.randperm(eg, generator=torch.Generator().manual_seed(i))[: k // n_groups] + grp * eg
                       for i in range(t) for grp in range(n_groups)]).view(t, k).to(DEVICE)
    weights = torch.rand(t, k, device=DEVICE, generator=g)
    kernels.set_batch_invariant(True)
    try:
        full = fused_moe(x, w13, w2, ids, weights, eg, n_groups)
        torch.testing.assert_close(full.double(), moe_reference(x, w13, w2, ids, weights, e), **tol(dtype))
        perm = torch.randperm(t, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        assert torch.equal(fused_moe(x[perm], w13, w2, ids[perm], weights[perm], eg, n_groups), full[perm])
        for i in (0, 5, t - 1):
            assert torch.equal(fused_moe(x[i:i + 1], w13, w2, ids[i:i + 1], weights[i:i + 1], eg, n_groups), full[i:i + 1])
        # one call per group (a worker holding one group), partials added in group order in float32
        out = torch.zeros(x.shape, dtype=torch.float32, device=DEVICE)
        kg = k // n_groups
        for grp in range(n_groups):
            sl = slice(grp * eg, (grp + 1) * eg)
            part = fused_moe(x, w13[sl], w2[sl], ids[:, grp * kg:(grp + 1) * kg] - grp * eg,
                             weights[:, grp * kg:(grp + 1) * kg], eg, 1)
            out += part.float()
        assert torch.equal(out.to(dtype), full)
    finally:
        kernels.set_batch_invariant(False)


def attention_reference(q, k_cache, v_cache, tables, ctx, scale):
    rows, heads, dh = q.shape
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for r in range(rows):
        c = int(ctx[r])
        slots = [int(tables[r, j // bs]) * bs + j % bs for j in range(c)]
        keys = k_cache.view(-1, kv_heads, dh)[slots].double()  # [c, Hkv, Dh]
        vals = v_cache.view(-1, kv_heads, dh)[slots].double()
        for h in range(heads):
            kh = h // (heads // kv_heads)
            p = torch.softmax(keys[:, kh] @ q[r, h].double() * scale, dim=0)
            out[r, h] = p @ vals[:, kh]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_split_attention_rows_depend_on_their_own_context_only(dtype):
    """Contexts across split boundaries; a row's result is the same alone, among other rows, with
    any number of programs per row and any block-table width."""
    from actors.model.kernels.paged_decode import paged_attention_fixed_splits

    g = gen(4)
    heads, kv_heads, dh, bs, kps = 4, 2, 16, 8, 64
    blocks = 48
    k_cache = randn(blocks, bs, kv_heads, dh, g=g, dtype=dtype)
    v_cache = randn(blocks, bs, kv_heads, dh, g=g, dtype=dtype)
    ctx = torch.tensor([1, 63, 64, 65, 130, 200, 256, 257], device=DEVICE)
    rows = ctx.numel()
    width = 40
    tables = torch.stack([torch.randperm(blocks, generator=torch.Generator().manual_seed(r))[:width]
                          for r in range(rows)]).to(DEVICE)
    q = randn(rows, heads, dh, g=g, dtype=dtype)
    out = paged_attention_fixed_splits(q, k_cache, v_cache, tables, ctx, 0.25, kps)
    torch.testing.assert_close(out.double(), attention_reference(q, k_cache, v_cache, tables, ctx, 0.25), **tol(dtype))
    for programs in (1, 3):
        assert torch.equal(paged_attention_fixed_splits(q, k_cache, v_cache, tables, ctx, 0.25, kps, programs), out)
    for r in (0, 3, rows - 1):
        narrow = tables[r:r + 1, : -(-int(ctx[r]) // bs)]  # only the blocks it uses
        assert torch.equal(paged_attention_fixed_splits(q[r:r + 1], k_cache, v_cache, narrow, ctx[r:r + 1], 0.25, kps), out[r:r + 1])
    empty = paged_attention_fixed_splits(q[:1], k_cache, v_cache, tables[:1], ctx[:1] * 0, 0.25, kps)
    assert torch.equal(empty, torch.zeros_like(empty))  # a row with no key (padding) is zeros, never garbage
