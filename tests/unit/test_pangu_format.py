"""A checkpoint in the exact Pangu Pro MoE format loads, and the model computes what a plain dense
re-implementation of MoGE computes (every expert on every token, masked by the group top-1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.weights.loader import load_model
from actors.model.reference import greedy_reference, one_sequence_batch
from actors.model.kv_cache import PagedKVCache
from tests.unit.conftest import PANGU_TINY_CONFIG

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """x [S, heads, hd]: rotate the pair (i, i + hd/2) by pos * theta^(-2i/hd)."""
    half = x.shape[-1] // 2
    angle = pos[:, None].double() * theta ** (-torch.arange(half).double() * 2 / x.shape[-1])
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _swiglu(x, gate, up, down):
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def dense_pangu_logits(t: dict[str, torch.Tensor], c: dict, ids: list[int]) -> torch.Tensor:
    """[S, V]: the whole forward written out, no cache, no routing shortcuts."""
    eps, heads, kv_heads = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // heads
    n, groups = c["num_experts"], c["num_experts_per_tok"]
    s = len(ids)
    pos = torch.arange(s)
    h = t["model.embed_tokens.weight"][torch.tensor(ids)]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        x = _rms(h, t[f"{p}.input_layernorm.weight"], eps)
        proj = lambda name: x @ t[f"{p}.self_attn.{name}.weight"].T + t[f"{p}.self_attn.{name}.bias"]  # noqa: E731
        q = _rope(proj("q_proj").view(s, heads, hd), pos, c["rope_theta"])
        k = _rope(proj("k_proj").view(s, kv_heads, hd), pos, c["rope_theta"])
        v = proj("v_proj").view(s, kv_heads, hd)
        rep = heads // kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, heads * hd)
        h = h + attn @ t[f"{p}.self_attn.o_proj.weight"].T + t[f"{p}.self_attn.o_proj.bias"]

        x = _rms(h, t[f"{p}.post_attention_layernorm.weight"], eps)
        if l in c["mlp_only_layers"]:
            h = h + _swiglu(x, t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"], t[f"{p}.mlp.down_proj.weight"])
            continue
        probs = (x @ t[f"{p}.mlp.gate.weight"].T).softmax(-1)  # [S, N]
        by_group = probs.view(s, groups, n // groups)
        keep = by_group == by_group.max(-1, keepdim=True).values  # top-1 in every group
        gate = (probs * keep.view(s, n)) * t[f"{p}.mlp.router_scale"][0]  # no renormalisation
        out = torch.zeros_like(h)
        for e in range(n):
            ep = f"{p}.mlp.experts.{e}"
            y = _swiglu(x, t[f"{ep}.gate_proj.weight"], t[f"{ep}.up_proj.weight"], t[f"{ep}.down_proj.weight"])
            out = out + gate[:, e : e + 1] * y
        sp = f"{p}.mlp.shared_expert"
        out = out + _swiglu(x, t[f"{sp}.gate_proj.weight"], t[f"{sp}.up_proj.weight"], t[f"{sp}.down_proj.weight"])
        h = h + out
    return _rms(h, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


def test_pangu_config_is_read_as_moge(pangu_checkpoint):
    path, _ = pangu_checkpoint
    cfg = load_model(str(path), dtype="float32", device="cpu").cfg
    assert (cfg.family, cfg.n_experts, cfg.n_groups, cfg.top_k, cfg.k_per_group) == ("moge", 16, 4, 4, 1)
    assert cfg.router_scale and cfg.attention_bias and cfg.o_bias and cfg.head_dim == 16
    assert cfg.dense_layers == (2,) and cfg.shared_intermediate_size == 40 and not cfg.shared_expert_gate


def test_pangu_logits_match_dense_reimplementation(pangu_checkpoint):
    path, tensors = pangu_checkpoint
    loaded = load_model(str(path), dtype="float32", device="cpu")
    kv = PagedKVCache.for_model(loaded.cfg, 2, 16, torch.float32, "cpu")
    batch = one_sequence_batch(PROMPT, 0, torch.arange(2), "cpu")
    batch.logits_index = torch.arange(len(PROMPT))
    got = loaded.model(batch, kv)
    expected = dense_pangu_logits(tensors, PANGU_TINY_CONFIG, PROMPT)
    assert expected.std() > 0.5
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pangu_greedy_decode_matches_dense_reimplementation(pangu_checkpoint):
    path, tensors = pangu_checkpoint
    loaded = load_model(str(path), dtype="float32", device="cpu")
    ids = list(PROMPT)
    for _ in range(6):
        ids.append(int(dense_pangu_logits(tensors, PANGU_TINY_CONFIG, ids)[-1].argmax()))
    assert greedy_reference(loaded, PROMPT, 6, stop_at_eos=False) == ids[len(PROMPT) :]
