"""The Triton kernels (actors/model/kernels/) against the torch code they replace, on fresh random
inputs. Runs on CUDA, or on a CPU through Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_kernels.py     # CPU: pip install triton "numpy<2.4"
    python -m pytest -q tests/gpu/test_kernels.py                        # CUDA

Skips without triton (CI) and on a CPU without the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA, or TRITON_INTERPRET=1 for Triton's CPU interpreter"),
]
# bf16 on the GPU as served; the interpreter computes in numpy, which has no bf16
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, device=DEVICE, generator=g).to(dtype)


def torch_rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_add_rms_norm(dtype):
    from actors.model.kernels.norm import add_rms_norm, rms_norm

    g = gen(1)
    h, d, w = randn(7, 96, dtype=dtype, g=g), randn(7, 96, dtype=dtype, g=g), randn(96, dtype=dtype, g=g)
    torch.testing.assert_close(rms_norm(h, w, 1e-6), torch_rms(h, w, 1e-6), **tol(dtype))
    new_h, normed = add_rms_norm(h, d, w, 1e-6)
    torch.testing.assert_close(new_h, h + d, **tol(dtype))
    torch.testing.assert_close(normed, torch_rms(h + d, w, 1e-6), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_two_halves_of_one_tensor(dtype):
    from actors.model.kernels.activation import silu_mul

    h = randn(5, 2 * 48, dtype=dtype, g=gen(2))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate, up), F.silu(gate) * up, **tol(dtype))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_rope_store_matches_torch(qk_norm):
    from actors.model.kernels.rope import qk_rope_store
    from actors.model.model import Rotary, apply_rotary

    g = gen(3)
    t, heads, kv_heads, dh, nb, bs = 6, 4, 2, 16, 5, 4
    q, k, v = randn(t, heads, dh, g=g), randn(t, kv_heads, dh, g=g), randn(t, kv_heads, dh, g=g)
    positions = torch.tensor([0, 1, 2, 9, 3, 17], device=DEVICE)
    slots = torch.randperm(nb * bs, device=DEVICE, generator=g)[:t]
    qw, kw = randn(dh, g=g), randn(dh, g=g)
    rot = Rotary(dh, 10000.0)
    cos, sin = rot.cos_sin(positions, torch.float32)
    qr, kr = (torch_rms(q, qw, 1e-6), torch_rms(k, kw, 1e-6)) if qk_norm else (q, k)
    want_q, want_k = apply_rotary(qr, cos, sin), apply_rotary(kr, cos, sin)

    kc, vc = torch.zeros(nb, bs, kv_heads, dh, device=DEVICE), torch.zeros(nb, bs, kv_heads, dh, device=DEVICE)
    norms = (qw, kw, 1e-6) if qk_norm else (None, None, 0.0)
    qk_rope_store(q, k, v, positions, rot.on(positions.device), *norms, kc, vc, slots)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc.view(-1, kv_heads, dh)[slots], want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc.view(-1, kv_heads, dh)[slots], v)


@pytest.mark.parametrize("family", ["moge", "qwen3_moe"])
def test_fused_router_matches_torch_router(family):
    from actors.model.config import ModelConfig
    from actors.model.routing import route, route_fused

    cfg = ModelConfig(family=family, vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=8, n_experts=48, n_groups=4 if family == "moge" else 1,
                      top_k=8 if family == "moge" else 6, moe_intermediate_size=8,
                      renormalize=family != "moge")
    g = gen(5)
    logits = randn(9, cfg.n_experts, g=g)
    scale = torch.rand(cfg.n_experts, device=DEVICE, generator=g) + 0.5 if family == "moge" else None
    ids, w = route_fused(cfg, logits, scale)
    want_ids, want_w = route(cfg, logits, scale)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_fused_moe_matches_local_experts_torch_path(dtype, tokens):
    """Both expert paths (GEMV always; grouped on CUDA bf16 past the GEMV limit), with slots of
    groups this holder lacks (ids outside [0, E)) ignored."""
    from actors.model.experts import slot_outputs
    from actors.model.kernels.moe import fused_moe

    g = gen(6)
    e, d, inter, k, eg = 8, 64, 32, 4, 2
    w13 = randn(e, 2 * inter, d, dtype=dtype, g=g) / 8
    w2 = randn(e, d, inter, dtype=dtype, g=g) / 8
    x = randn(tokens, d, dtype=dtype, g=g)
    ids = torch.randint(-2, e + 2, (tokens, k), device=DEVICE, generator=g)
    w = torch.rand(tokens, k, device=DEVICE, generator=g)
    slots = slot_outputs(w13.float(), w2.float(), x.float(), ids, w)  # [T, K, D] float32 reference
    group = ids.clamp(0, e - 1) // eg
    want = sum((slots * (group == gi).unsqueeze(-1)).sum(1).to(dtype).float() for gi in range(e // eg)).to(dtype)
    for limit in (0, 1 << 20):  # grouped where usable, then GEMV
        got = fused_moe(x, w13, w2, ids, w, eg, e // eg, gemv_max_tokens=limit)
        torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


@pytest.mark.parametrize("block_n, block_k", [(4, 512), (32, 16), (16, 256)])
def test_expert_gemv_any_tile_shape(block_n, block_k):
    """The tile shapes the autotuner may pick give the same products (rows and widths not multiples)."""
    from actors.model.kernels.moe import expert_gemv

    g = gen(7)
    w = randn(5, 40, 72, g=g)
    x = randn(3, 72, g=g)
    ids = torch.tensor([0, 4, -1, 2, 2, 7], device=DEVICE)  # K = 2 slots per token; -1, 7: not ours
    got = expert_gemv(x, w, ids, 2, act=False, block_n=block_n, block_k=block_k)
    ok = (ids >= 0) & (ids < 5)
    want = torch.einsum("and,ad->an", w[ids.clamp(0, 4)], x[torch.arange(6, device=DEVICE) // 2]) * ok[:, None]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    h = randn(6, 2 * 36, g=g)
    w2 = randn(5, 40, 36, g=g)
    act = F.silu(h[:, :36]) * h[:, 36:]
    got = expert_gemv(h, w2, ids, 2, act=True, block_n=block_n, block_k=block_k)
    want = torch.einsum("and,ad->an", w2[ids.clamp(0, 4)], act) * ok[:, None]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def kernels_everywhere():
    """The model's fused path on this device (on CPU: Triton's interpreter)."""
    from actors.model import kernels

    kernels.set_enabled(True, on_cpu=True)
    yield
    kernels.set_enabled(True)


@pytest.mark.parametrize("preset_family", ["moge", "qwen3_moe"])
def test_model_through_the_kernels_matches_the_torch_path(kernels_everywhere, preset_family):
    """Whole model, prefill + decode steps: every kernel in place (router, norms, RoPE + KV write,
    paged decode attention, expert GEMV + combine) against the plain torch code, float32."""
    from dataclasses import replace

    from actors.model import kernels
    from actors.model.presets import get_preset
    from actors.model.reference import greedy_logits
    from actors.weights.loader import LoadedModel, build_model, random_attention_part, random_expert_groups
    from actors.model.local_experts import LocalExperts

    cfg = get_preset("tiny-moge")
    if preset_family == "qwen3_moe":
        cfg = replace(cfg, family="qwen3_moe", qk_norm=True, renormalize=True, router_scale=False,
                      shared_intermediate_size=0, attention_bias=False, o_bias=False, top_k=3)
    state = random_attention_part(cfg, 0, torch.float32, torch.device(DEVICE))
    groups = random_expert_groups(cfg, range(cfg.n_groups), 0, torch.float32, torch.device(DEVICE))
    model = build_model(cfg, state, LocalExperts(cfg, groups))
    loaded = LoadedModel(model, cfg, None, "t", groups, "", torch.float32, torch.device(DEVICE), 0)
    prompt = [5, 77, 3, 190, 42, 8, 11]
    fast_tokens, fast_logits = greedy_logits(loaded, prompt, 6, stop_at_eos=False)
    kernels.set_enabled(False)
    model.experts = LocalExperts(cfg, groups)  # the experts choose their kernels when built
    assert model.choose_kernels() is False  # and so does the model: once, not per call
    tokens, logits = greedy_logits(loaded, prompt, 6, stop_at_eos=False)
    assert fast_tokens == tokens
    torch.testing.assert_close(fast_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["moge", "qwen3_moe"])
def test_group_partials_sum_to_the_fused_dispatch(kernels_everywhere, family):
    """A group's partial computed alone (as an expert worker or a local holder does) adds up, in
    group order, to exactly what the one-pass fused dispatch returns."""
    from dataclasses import replace

    from actors.model.local_experts import LocalExperts
    from actors.model.presets import get_preset
    from actors.weights.loader import random_expert_groups

    cfg = get_preset("tiny-moge")
    if family == "qwen3_moe":
        cfg = replace(cfg, family="qwen3_moe", router_scale=False, renormalize=True, top_k=3)
    experts = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0, torch.float32, DEVICE))
    g = gen(8)
    x = randn(5, cfg.hidden_size, g=g)
    logits = randn(5, cfg.n_experts, g=g)
    if family == "moge":
        probs = logits.softmax(-1).view(5, cfg.n_groups, -1)
        w, local = probs.max(-1)
        ids = local + torch.arange(cfg.n_groups, device=DEVICE) * cfg.experts_per_group
    else:
        w, ids = logits.softmax(-1).topk(cfg.top_k)
    whole = experts.dispatch(0, x, ids, w).wait()
    parts = experts.compute.partials(0, x, ids, w)  # [G, T, D]: the fused kernel's per-group combine
    total = torch.zeros(x.shape, dtype=torch.float32, device=DEVICE)
    for p in parts:
        total += p.float()
    assert torch.equal(whole, total.to(x.dtype))
    # the same groups held apart (one group_forward each, as a worker holding them unstacked)
    from actors.model.group_compute import GroupCompute

    apart = GroupCompute(cfg, {g: wts.to() for g, wts in experts.groups.items()}, stack=False)
    assert torch.equal(apart.partials(0, x, ids, w), parts)
    # a lane serving every group replies their sum: the same float32 sum before the cast
    assert torch.equal(experts.compute.combined(0, x, ids, w, out_dtype=torch.float32), total)


def test_expert_gemv_bits_do_not_depend_on_the_tuned_tile_or_the_assignment_count():
    """Every tile the autotuner may pick (per process, by timing) and every number of assignments
    in a call give the same bits per row: a replica and an expert worker that tuned differently,
    or a stacked call (every group's slots) and a per-group call, agree exactly."""
    from actors.model.kernels.moe import GEMV_BLOCK_K, _expert_gemv_tuned, expert_gemv

    dtype = DTYPES[-1]
    g = gen(9)
    w = randn(6, 96, 600, dtype=dtype, g=g) / 8
    x = randn(8, 600, dtype=dtype, g=g)
    ids = torch.randint(0, 6, (8 * 2,), device=DEVICE, generator=g)
    outs = []
    for cfg in _expert_gemv_tuned.configs:
        assert cfg.kwargs["BLOCK_K"] == GEMV_BLOCK_K and cfg.kwargs["BLOCK_N"] >= cfg.num_warps
        outs.append(expert_gemv(x, w, ids, 2, act=False, block_n=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # only the first token's slots, as a call with fewer assignments
    first = expert_gemv(x[:1], w, ids[:2], 2, act=False, block_n=16)
    assert torch.equal(first, outs[0][:2])


@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("k_per_group", [1, 2])
def test_split_local_and_remote_partials_equal_the_stacked_dispatch(kernels_everywhere, tokens, k_per_group):
    """The 1 -> 2 device case in the served dtype: half the groups in process (LocalExperts'
    group_partials), half as an expert worker computes them (group_forward per group), summed in
    group order in float32 and cast once, equal the all-local stacked fused dispatch bit for bit.
    Both expert paths: GEMV (3 tokens) and grouped (40, CUDA bf16)."""
    from dataclasses import replace

    from actors.model.experts import group_forward
    from actors.model.local_experts import LocalExperts
    from actors.model.presets import get_preset
    from actors.weights.loader import random_expert_groups

    dtype = DTYPES[-1]
    cfg = get_preset("tiny-moge")
    cfg = replace(cfg, top_k=cfg.n_groups * k_per_group)
    groups = random_expert_groups(cfg, range(cfg.n_groups), 0, dtype, DEVICE)
    whole = LocalExperts(cfg, {gi: w.to() for gi, w in groups.items()})
    half = cfg.n_groups // 2
    local = LocalExperts(cfg, {gi: groups[gi].to() for gi in range(half)})
    g = gen(10)
    x = randn(tokens, cfg.hidden_size, dtype=dtype, g=g)
    probs = randn(tokens, cfg.n_experts, g=g).softmax(-1).view(tokens, cfg.n_groups, -1)
    w, local_ids = probs.topk(k_per_group, dim=-1)  # [T, G, kg]
    ids = (local_ids + (torch.arange(cfg.n_groups, device=DEVICE) * cfg.experts_per_group)[:, None]).reshape(tokens, -1)
    w = w.reshape(tokens, -1).contiguous()
    want = whole.dispatch(0, x, ids, w).wait()
    parts = dict(zip(local.compute.held, local.compute.partials(0, x, ids, w)))
    for gi in range(half, cfg.n_groups):  # as ExpertWorker.compute: the group's own slots, masked others
        kg = k_per_group
        gw = groups[gi]
        parts[gi] = group_forward(gw.w13[0], gw.w2[0], x, ids - gw.first_expert, w)
        other = group_forward(gw.w13[0], gw.w2[0], x, ids[:, gi * kg:(gi + 1) * kg] - gw.first_expert,
                              w[:, gi * kg:(gi + 1) * kg])
        assert torch.equal(parts[gi], other)  # compacted or not, the same partial
    total = torch.zeros(x.shape, dtype=torch.float32, device=DEVICE)
    for gi in sorted(parts):
        total += parts[gi].float()
    assert torch.equal(total.to(dtype), want)
