"""Presets in FP8: the construction path of `pangu-pro-moe-72b` (random weights made on the device
and quantized tensor by tensor, expert groups in their MoGE layout) on a scaled-down copy of its
shape, so CI checks on a CPU what the GPU benchmark builds at full size."""

from __future__ import annotations

from dataclasses import replace

import torch

from actors.model.quant.blocks import BlockFp8
from actors.model.quant.linear import Fp8Linear
from actors.model.presets import get_preset
from actors.model.reference import greedy_logits
from actors.weights import loader
from actors.weights.loader import build_preset, dequantized


def small_pangu():
    """Pangu Pro MoE's structure (64 experts in 8 groups, one kept per group, shared expert, router
    scale, biases) at hidden 128, expert width 168 (a partial 128-block, as Pangu's 1344), 2 layers."""
    cfg = get_preset("pangu-pro-moe-72b")
    return replace(cfg, vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                   moe_intermediate_size=168, shared_intermediate_size=192, max_position_embeddings=512)


def test_pangu_72b_preset_shape():
    cfg = get_preset("pangu-pro-moe-72b")
    per_layer_experts = cfg.n_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    attn = 2 * cfg.hidden_size * cfg.num_heads * cfg.head_dim + 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
    shared = 3 * cfg.hidden_size * cfg.shared_intermediate_size
    total = cfg.num_layers * (per_layer_experts + attn + shared) + 2 * cfg.vocab_size * cfg.hidden_size
    active = cfg.num_layers * (per_layer_experts * cfg.top_k // cfg.n_experts + attn + shared) + 2 * cfg.vocab_size * cfg.hidden_size
    assert 71e9 < total < 73e9 and 15e9 < active < 17.5e9  # "72B total, 16B active"
    assert (cfg.n_experts, cfg.n_groups, cfg.k_per_group) == (64, 8, 1)


def test_scaled_pangu_builds_in_fp8_tensor_by_tensor_and_computes_its_dequantized_model(monkeypatch):
    cfg = small_pangu()
    largest = []
    real_quantize = loader.quantize
    monkeypatch.setattr(loader, "quantize", lambda w, split=0: (largest.append(w.numel()), real_quantize(w, split))[1])
    m = build_preset(cfg, "pangu-small", seed=3, quantization="fp8")
    eg, inner, d = cfg.experts_per_group, cfg.moe_intermediate_size, cfg.hidden_size
    # made and quantized one tensor at a time: never more than one (layer, group) w13 in float
    assert max(largest) == eg * 2 * inner * d
    assert sorted(m.expert_groups) == list(range(8))
    for g, w in m.expert_groups.items():
        assert w.first_expert == g * eg
        assert isinstance(w.w13[0], BlockFp8) and w.w13[0].shape == (eg, 2 * inner, d) and w.w13[0].split == inner
    layer = m.model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, p), Fp8Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(layer.mlp.shared_expert.down_proj, Fp8Linear)
    assert not isinstance(layer.mlp.gate, Fp8Linear) and m.model.lm_head.weight.dtype == torch.float32
    assert m.model.embed_tokens.weight.dtype == torch.float32 and layer.mlp.router_scale.dtype == torch.float32

    # a process that builds one group gets the same FP8 bytes: the groups can be split over devices
    one = build_preset(cfg, "pangu-small", seed=3, groups=[5], quantization="fp8").expert_groups[5]
    assert torch.equal(one.w13[1].q.view(torch.uint8), m.expert_groups[5].w13[1].q.view(torch.uint8))
    assert torch.equal(one.w2[1].scale, m.expert_groups[5].w2[1].scale)

    prompt = [7, 300, 12, 45]
    tokens, logits = greedy_logits(m, prompt, 2, stop_at_eos=False)
    want, want_logits = greedy_logits(dequantized(m), prompt, 2, stop_at_eos=False)
    assert tokens == want
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    experts_fp32 = cfg.num_layers * cfg.n_experts * 3 * d * inner * 4
    assert m.expert_bytes < 0.27 * experts_fp32  # one byte a weight, plus a float32 scale per block
