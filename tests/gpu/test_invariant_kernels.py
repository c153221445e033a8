"""The kernels of `engine.batch_invariant` (actors/model/kernels/invariant_matmul.py; the varlen paged
attention, kernels/paged_attention.py, under one launch config per engine): right against float64
torch, and each row the same bits whatever the other rows — their number, order and grouping.

    python -m pytest -q tests/gpu/test_invariant_kernels.py                        # CUDA: the real MMAs
    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_invariant_kernels.py     # CPU: the kernels' logic

On the interpreter tl.dot is numpy's matmul, whose BLAS rounds a row by its position in the tile; the
tests swap in a dot that reduces every element in one fixed order (what a tensor-core MMA does per
row), so what they check there is the kernels' own indexing, masking and split order. On CUDA they
check the hardware too. Skips without triton (CI) and on a CPU without the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from tests.gpu.test_kernels import DEVICE, DTYPES, pytestmark  # noqa: E402,F401 - the same device and skip rules


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


def test_invariant_attention_config_bounds_the_splits():
    from actors.model.kernels.invariant import KEYS_PER_SPLIT, MAX_SPLITS, attention_config

    q, k_cache = torch.empty(1, 32, 128), torch.empty(1, 16, 4, 128)
    for max_context, keys in ((1024, KEYS_PER_SPLIT), (4096, 512), (40960, 5120)):
        cfg = attention_config(q, k_cache, max_context)
        assert (cfg.split_keys, cfg.splits) == (keys, min(MAX_SPLITS, -(-max_context // keys)))
        assert cfg == attention_config(torch.empty(3000, 32, 128), k_cache, max_context)  # not by the token count


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_rows_depend_on_their_own_context_only(dtype):
    """The varlen kernel under one invariant launch config: a token's result is the same decoded
    alone, decoded beside others, as the last token of a prefill chunk, or inside a chunk that
    starts elsewhere — across split boundaries (split 64, the last split taking the rest)."""
    from actors.model.kernels import paged_attention as pa
    from tests.gpu.test_varlen_attention import case, reference

    policy = pa.AttentionPolicy(split_keys=64, max_splits=4, batch_invariant=True)
    cfg = policy.config(1, 4, 512, dtype)  # the same for every launch
    # sequence 0: 30 new tokens ending at position 299; sequence 1 decodes at 150; 2 at 64
    q, kc, vc, tables, qs, ctx = case([(30, 300), (1, 151), (1, 65)], 8, 8, 2, 16, dtype, seed=5)
    mixed = pa.varlen_paged_attention(q, kc, vc, tables, qs, ctx, 0.25, 512, config=cfg)
    torch.testing.assert_close(mixed.double().cpu(), reference(q, kc, vc, tables, qs, ctx, 0.25), **tol(dtype))
    one = torch.tensor([0, 1], device=DEVICE)
    for tok, seq, position in ((29, 0, 299), (5, 0, 275), (30, 1, 150), (31, 2, 64)):
        alone = pa.varlen_paged_attention(q[tok:tok + 1].contiguous(), kc, vc, tables[seq:seq + 1], one,
                                          torch.tensor([position + 1], device=DEVICE), 0.25, 512, config=cfg)
        assert torch.equal(alone[0], mixed[tok]), (tok, position)
    # sequence 0's tokens 275..288 as their own chunk (a different start, other rows beside them)
    chunk = pa.varlen_paged_attention(q[5:19].contiguous(), kc, vc, tables[:1], torch.tensor([0, 14], device=DEVICE),
                                      torch.tensor([289], device=DEVICE), 0.25, 512, config=cfg)
    assert torch.equal(chunk, mixed[5:19])
