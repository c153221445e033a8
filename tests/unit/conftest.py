"""Shared unit-test helpers: tiny random HF MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) built
with transformers and saved with save_pretrained, built once per session."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Small enough for 2 CPU cores; 8 experts so top-2 choices and 4 groups of 2 are both meaningful.
# Expert widths 2I != D, so the orientation of fused expert tensors is unambiguous.
TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


@dataclass
class HFCheckpoint:
    family: str
    path: Path
    model: object  # the transformers model the checkpoint was saved from (float32, eval)


def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations and well-separated router scores (no top-k near-ties), and
    norm weights away from 1 so a norm that is not loaded shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name.endswith("gate.weight") and p.shape[0] > 1:  # router [E, D]
                p.copy_(noise * 3.0 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_hf_moe(family: str, seed: int = 0):
    import transformers as tf

    if family == "mixtral":
        cfg = tf.MixtralConfig(
            **TINY_SHAPE, intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2
        )
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **TINY_SHAPE,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            qkv_bias=True,
        )
        cls = tf.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **TINY_SHAPE,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    fill_random(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_moe_checkpoints(tmp_path_factory) -> dict[str, HFCheckpoint]:
    """family -> HFCheckpoint written by save_pretrained (per-expert layout, one file)."""
    out = {}
    for i, family in enumerate(("mixtral", "qwen2_moe", "qwen3_moe")):
        model = build_hf_moe(family, seed=100 + i)
        path = tmp_path_factory.mktemp(f"hf_{family}")
        model.save_pretrained(path)
        out[family] = HFCheckpoint(family, path, model)
    return out


# ---- a tiny checkpoint in the exact Pangu Pro MoE format ------------------------------------------

PANGU_TINY_CONFIG = dict(
    architectures=["PanguProMoEForCausalLM"],
    model_type="PanGuMoE",
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    intermediate_size=48,
    mlp_only_layers=[2],  # one dense layer, to cover the optional field
    num_experts=16,
    num_experts_per_tok=4,  # no num_groups: G = K = 4, one expert kept per group
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    hidden_act="silu",
)


def pangu_tensors(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under Pangu Pro MoE's names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    d, v, n = c["hidden_size"], c["vocab_size"], c["num_experts"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    moe_i, shared_i, dense_i = c["moe_intermediate_size"], c["shared_expert_intermediate_size"], c["intermediate_size"]

    def w(*shape, std=None):
        return torch.randn(*shape, generator=gen) * (std if std is not None else shape[-1] ** -0.5)

    t = {"model.embed_tokens.weight": w(v, d, std=1.0), "model.norm.weight": 1 + w(d, std=0.1), "lm_head.weight": w(v, d)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        t[f"{p}.input_layernorm.weight"] = 1 + w(d, std=0.1)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + w(d, std=0.1)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            t[f"{p}.self_attn.{name}.weight"] = w(rows, d)
            t[f"{p}.self_attn.{name}.bias"] = w(rows, std=0.1)
        t[f"{p}.self_attn.o_proj.weight"] = w(d, q)
        t[f"{p}.self_attn.o_proj.bias"] = w(d, std=0.1)
        if l in c.get("mlp_only_layers", []):
            t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"] = w(dense_i, d), w(dense_i, d)
            t[f"{p}.mlp.down_proj.weight"] = w(d, dense_i)
            continue
        t[f"{p}.mlp.gate.weight"] = w(n, d, std=3 * d**-0.5)
        t[f"{p}.mlp.router_scale"] = 0.5 + torch.rand(1, n, generator=gen)
        for e in range(n):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = w(moe_i, d)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = w(moe_i, d)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = w(d, moe_i)
        t[f"{p}.mlp.shared_expert.gate_proj.weight"] = w(shared_i, d)
        t[f"{p}.mlp.shared_expert.up_proj.weight"] = w(shared_i, d)
        t[f"{p}.mlp.shared_expert.down_proj.weight"] = w(d, shared_i)
    return t


def write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json + safetensors; with shards > 1, several files and model.safetensors.index.json."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="session")
def pangu_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(dir, tensors) of a one-file tiny Pangu Pro MoE checkpoint."""
    tensors = pangu_tensors(PANGU_TINY_CONFIG, seed=11)
    return write_checkpoint(tmp_path_factory.mktemp("pangu"), PANGU_TINY_CONFIG, tensors), tensors
