"""Named model shapes with random weights: a CPU demo/test model, GPU benchmark models (a 12-layer
MoGE one and the full 48-layer Qwen3-30B-A3B shape, ~61 GB in bf16, made on the device: no disk) and
the full Pangu Pro MoE 72B shape (for sizing only; never instantiated in tests).

Preset weights are random (actors/weights/loader.py, fixed seed); the byte tokenizer's ids are
0..255 bytes, then BOS 256, EOS 257, PAD 258 (actors/weights/tokenizer.py).
"""

from __future__ import annotations

from actors.model.config import ModelConfig

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258

PRESETS: dict[str, ModelConfig] = {
    # Pangu-shaped in miniature: 16 experts in 4 groups, 1 kept per group, router scale, qkv/o bias.
    "tiny-moge": ModelConfig(
        family="moge",
        vocab_size=512,
        hidden_size=128,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        n_experts=16,
        n_groups=4,
        top_k=4,
        moe_intermediate_size=128,
        shared_intermediate_size=128,
        router_scale=True,
        attention_bias=True,
        o_bias=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        bos_token_id=BYTE_BOS,
        eos_token_ids=(BYTE_EOS,),
        pad_token_id=BYTE_PAD,
        architecture="PanguProMoEForCausalLM",
    ),
    # Per layer about Qwen3-30B-A3B's cost (D 2048, 32x128 query heads, 4 KV heads, 8 x 768 routed
    # experts per token) plus a Pangu-style shared expert; 12 layers keep it on one GPU (~8 GB bf16).
    "bench-moge": ModelConfig(
        family="moge",
        vocab_size=32000,
        hidden_size=2048,
        num_layers=12,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        n_experts=64,
        n_groups=8,
        top_k=8,
        moe_intermediate_size=768,
        shared_intermediate_size=1536,
        router_scale=True,
        attention_bias=True,
        o_bias=True,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        bos_token_id=BYTE_BOS,
        eos_token_ids=(BYTE_EOS,),
        pad_token_id=BYTE_PAD,
        architecture="PanguProMoEForCausalLM",
    ),
    # Qwen3-30B-A3B's shape (config.json of the release: 48 layers, 128 experts, top-8 renormalised,
    # expert width 768, q/k RMSNorm, 32 query / 4 KV heads of 128) with random weights: full-depth
    # decode timings without a checkpoint. 8 groups of 16 experts (a deployment choice for top-k).
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        n_experts=128,
        n_groups=8,
        top_k=8,
        moe_intermediate_size=768,
        renormalize=True,
        qk_norm=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        bos_token_id=BYTE_BOS,
        eos_token_ids=(BYTE_EOS,),
        pad_token_id=BYTE_PAD,
        architecture="Qwen3MoeForCausalLM",
    ),
    # Pangu Pro MoE 72B-A16B. vocab_size, rope_theta and max_position_embeddings are the defaults
    # of the released configuration_pangu_moe.py (153376, 1.6e7, 131072).
    "pangu-pro-moe-72b": ModelConfig(
        family="moge",
        vocab_size=153376,
        hidden_size=5120,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        n_experts=64,
        n_groups=8,
        top_k=8,
        moe_intermediate_size=1344,
        shared_intermediate_size=5376,
        router_scale=True,
        attention_bias=True,
        o_bias=True,
        rope_theta=16000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        bos_token_id=BYTE_BOS,
        eos_token_ids=(BYTE_EOS,),
        pad_token_id=BYTE_PAD,
        architecture="PanguProMoEForCausalLM",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
