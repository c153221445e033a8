"""Small checkpoints the tests write with transformers (no weights can be downloaded here)."""

from __future__ import annotations

import torch


def write_qwen3_moe(path) -> str:
    """A 2-layer Qwen3-MoE (8 experts, top-2) saved in HF format under `path`; returns the path.
    Weights are scaled for O(1) activations and decisive router scores, so greedy tokens are stable."""
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
    )
    torch.manual_seed(11)
    model = tf.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, (3.0 if name.endswith("gate.weight") else 1.0) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return str(path)
