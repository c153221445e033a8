"""Small checkpoints the tests write with transformers (no weights can be downloaded here)."""

from __future__ import annotations

import torch


def random_qwen3_moe(seed: int, **shape):
    """A float32 Qwen3-MoE (8 experts, top-2, 2 layers unless `shape` says otherwise) with weights
    scaled for O(1) activations and decisive router scores, so greedy tokens are stable."""
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(**{
        "vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 48, "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 256, **shape,
    })
    torch.manual_seed(seed)
    model = tf.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, (3.0 if name.endswith("gate.weight") else 1.0) / p.shape[-1] ** 0.5)
    return model


def write_qwen3_moe(path) -> str:
    """random_qwen3_moe saved in HF format under `path`; returns the path."""
    random_qwen3_moe(11).save_pretrained(path)
    return str(path)


# ---- a block-scaled FP8 checkpoint in the HF "fp8" format, written by hand ---------------------------

FP8_BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_NOT_CONVERTED = ("model.layers.1.self_attn.o_proj",)  # stays float in the checkpoint, as listed


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q float8_e4m3fn, weight_scale_inv [..., ceil(N/128), ceil(K/128)]): scale =
    amax(|block|) / 448, block by block (partial edge blocks included). Written out with loops on
    purpose: independent of the engine's vectorised quantizer it checks."""
    *lead, n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(*lead, nb, kb)
    for i in range(nb):
        for j in range(kb):
            rows, cols = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            block = w[..., rows, cols].float()
            amax = block.abs().amax(dim=(-2, -1))
            scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
            s[..., i, j] = scale
            q[..., rows, cols] = (block / scale[..., None, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = q.float().clone()
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            rows, cols = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            out[..., rows, cols] *= s[..., i, j][..., None, None]
    return out


def _fp8_convertible(name: str) -> bool:
    """What transformers' FP8 quantizer converts: every Linear weight but the LM head (the router
    included) and the modules listed as not converted."""
    return (name.endswith(".weight") and name.startswith("model.layers.") and "norm" not in name
            and name[: -len(".weight")] not in FP8_NOT_CONVERTED)


def write_qwen3_moe_fp8(path, layout: str = "per_expert") -> tuple[str, str]:
    """A 2-layer Qwen3-MoE (8 experts, top-2; layer 1 a dense MLP) with widths that are not multiples
    of 128 (hidden 192, expert width 160), written twice under `path`: `fp8/` in the HF FP8 format
    (float8 weights + weight_scale_inv, quantization_config) in the per-expert or fused expert layout,
    and `dequantized/`, a plain float32 checkpoint of exactly the weights the FP8 one means.
    -> (fp8 directory, dequantized directory)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    root = Path(path)
    model = random_qwen3_moe(12, hidden_size=192, head_dim=32, intermediate_size=160, moe_intermediate_size=160,
                             mlp_only_layers=[1])
    cfg = model.config
    model.save_pretrained(root / "float")
    tensors = load_file(str(root / "float" / "model.safetensors"))
    fp8, dense = {}, {}
    for name, t in tensors.items():
        if _fp8_convertible(name) and ".experts." not in name:
            q, s = quantize_blocks(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dense[name] = dequantize_blocks(q, s)
        elif ".experts." not in name:
            fp8[name] = dense[name] = t
    experts = 8
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.gate_up_proj" in tensors:  # a transformers version that saves the fused layout
            gate_up, down = tensors[f"{p}.gate_up_proj"], tensors[f"{p}.down_proj"]
            half = gate_up.shape[1] // 2
            per = {(e, part): t for e in range(experts) for part, t in (
                ("gate_proj", gate_up[e, :half]), ("up_proj", gate_up[e, half:]), ("down_proj", down[e]))}
        elif f"{p}.0.gate_proj.weight" in tensors:
            per = {(e, part): tensors[f"{p}.{e}.{part}.weight"] for e in range(experts) for part in ("gate_proj", "up_proj", "down_proj")}
        else:
            continue  # a dense layer
        if layout == "per_expert":
            for (e, part), t in per.items():
                q, s = quantize_blocks(t)
                fp8[f"{p}.{e}.{part}.weight"], fp8[f"{p}.{e}.{part}.weight_scale_inv"] = q, s
                dense[f"{p}.{e}.{part}.weight"] = dequantize_blocks(q, s)
        else:  # fused [E, 2I, D] / [E, D, I], each quantized as one block grid per expert
            gate_up = torch.stack([torch.cat([per[e, "gate_proj"], per[e, "up_proj"]]) for e in range(experts)])
            down = torch.stack([per[e, "down_proj"] for e in range(experts)])
            for fused_name, t in (("gate_up_proj", gate_up), ("down_proj", down)):
                q, s = quantize_blocks(t)
                fp8[f"{p}.{fused_name}"], fp8[f"{p}.{fused_name}_scale_inv"] = q, s
                back = dequantize_blocks(q, s)
                for e in range(experts):
                    if fused_name == "down_proj":
                        dense[f"{p}.{e}.down_proj.weight"] = back[e]
                    else:
                        inner = back.shape[1] // 2
                        dense[f"{p}.{e}.gate_proj.weight"], dense[f"{p}.{e}.up_proj.weight"] = back[e, :inner], back[e, inner:]
    config = json.loads((root / "float" / "config.json").read_text())
    for sub, state, extra in (("fp8", fp8, {"quantization_config": {**FP8_CONFIG, "modules_to_not_convert": list(FP8_NOT_CONVERTED)}}),
                              ("dequantized", dense, {})):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps({**config, **extra}))
        save_file({n: t.contiguous() for n, t in state.items()}, str(root / sub / "model.safetensors"))
    return str(root / "fp8"), str(root / "dequantized")
