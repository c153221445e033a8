"""config.json of an HF-format checkpoint -> ModelConfig, one small function per family, and its
quantization_config checked (actors/weights/quantization.py says what is accepted and why)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from actors.model.config import ModelConfig

PANGU_ARCHITECTURES = ("PanguProMoEForCausalLM",)
PANGU_MODEL_TYPES = ("PanGuMoE", "PanguProMoE", "pangu_moe", "pangu_pro_moe")


class UnsupportedModelError(ValueError):
    """The checkpoint is of a family or variant this server does not implement."""


class UnsupportedQuantizationError(UnsupportedModelError):
    """The checkpoint is quantized in a way this server cannot compute correctly."""


@dataclass(frozen=True)
class CheckpointQuant:
    """The quantization_config of an accepted FP8 checkpoint."""

    activation_scheme: str = "dynamic"
    scale_fmt: str = "float"
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert / ignored_layers, as written


def checkpoint_quantization(config: dict) -> CheckpointQuant | None:
    """config.json's quantization_config -> CheckpointQuant, None without one; refuses the rest."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method != "fp8":
        raise UnsupportedQuantizationError(
            f"quantization_config.quant_method {q.get('quant_method')!r} is not supported; this server reads "
            "block-scaled FP8 checkpoints (quant_method 'fp8', weight_block_size [128, 128]) or unquantized ones"
        )
    block = q.get("weight_block_size")
    if not isinstance(block, (list, tuple)) or list(block) != [128, 128]:
        raise UnsupportedQuantizationError(
            f"FP8 weight_block_size {block!r} is not supported (only [128, 128] blocks; None means per-tensor scales)"
        )
    fmt = str(q.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise UnsupportedQuantizationError(f"FP8 fmt {q.get('fmt')!r} is not supported (only e4m3)")
    scheme = str(q.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise UnsupportedQuantizationError(f"FP8 activation_scheme {q.get('activation_scheme')!r} is not supported")
    scale_fmt = str(q.get("scale_fmt", "float")).lower()
    if scale_fmt not in ("float", "ue8m0"):
        raise UnsupportedQuantizationError(f"FP8 scale_fmt {q.get('scale_fmt')!r} is not supported")
    if str(q.get("expert_dtype", "fp8")).lower() != "fp8":
        raise UnsupportedQuantizationError(f"FP8 expert_dtype {q.get('expert_dtype')!r} is not supported (only fp8)")
    skipped = q.get("modules_to_not_convert") or q.get("ignored_layers") or ()
    return CheckpointQuant(scheme, scale_fmt, tuple(skipped))


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}  # transformers 5 moves rope settings here
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"RoPE scaling {rope_type!r} is not supported")
    return float(c.get("rope_theta", params.get("rope_theta", 10000.0)))


def _eos(c: dict) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _default_groups(n_experts: int) -> int:
    """Top-k checkpoints: up to 8 contiguous expert shards (a deployment choice, see with_groups)."""
    return math.gcd(n_experts, 8)


def _common(c: dict, family: str) -> dict:
    if c.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {c['hidden_act']!r} is not supported (only silu)")
    if c.get("use_sliding_window") or (family == "mixtral" and c.get("sliding_window")):
        raise UnsupportedModelError("sliding-window attention is not supported")
    heads = c["num_attention_heads"]
    return dict(
        family=family,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rope_theta=_rope_theta(c),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id"),
        architecture=(c.get("architectures") or [""])[0],
    )


def _qwen_dense_layers(c: dict) -> tuple[int, ...]:
    step = c.get("decoder_sparse_step", 1) or 1
    only = set(c.get("mlp_only_layers") or [])
    return tuple(l for l in range(c["num_hidden_layers"]) if l in only or (l + 1) % step != 0)


def _pangu(c: dict) -> ModelConfig:
    k = c["num_experts_per_tok"]
    n = c["num_experts"]
    return ModelConfig(
        **{**_common(c, "moge"), "head_dim": c["hidden_size"] // c["num_attention_heads"]},
        n_experts=n,
        n_groups=c.get("num_groups") or k,  # Pangu Pro: K = G = 8, one expert kept per group
        top_k=k,
        moe_intermediate_size=c["moe_intermediate_size"],
        intermediate_size=c.get("intermediate_size", 0),
        shared_intermediate_size=c.get("shared_expert_intermediate_size", 0),
        router_scale=True,
        attention_bias=True,
        o_bias=True,
        dense_layers=tuple(c.get("mlp_only_layers") or ()),
    )


def _mixtral(c: dict) -> ModelConfig:
    n = c["num_local_experts"]
    return ModelConfig(
        **_common(c, "mixtral"),
        n_experts=n,
        n_groups=_default_groups(n),
        top_k=c["num_experts_per_tok"],
        moe_intermediate_size=c["intermediate_size"],
        renormalize=True,
    )


def _qwen2_moe(c: dict) -> ModelConfig:
    n = c["num_experts"]
    return ModelConfig(
        **_common(c, "qwen2_moe"),
        n_experts=n,
        n_groups=_default_groups(n),
        top_k=c["num_experts_per_tok"],
        moe_intermediate_size=c["moe_intermediate_size"],
        intermediate_size=c.get("intermediate_size", 0),
        shared_intermediate_size=c.get("shared_expert_intermediate_size", 0),
        shared_expert_gate=bool(c.get("shared_expert_intermediate_size", 0)),
        renormalize=bool(c.get("norm_topk_prob", False)),
        attention_bias=bool(c.get("qkv_bias", True)),  # configs before transformers 5 imply True
        dense_layers=_qwen_dense_layers(c),
    )


def _qwen3_moe(c: dict) -> ModelConfig:
    n = c.get("num_experts") or c["num_local_experts"]
    return ModelConfig(
        **_common(c, "qwen3_moe"),
        n_experts=n,
        n_groups=_default_groups(n),
        top_k=c["num_experts_per_tok"],
        moe_intermediate_size=c["moe_intermediate_size"],
        intermediate_size=c.get("intermediate_size", 0),
        renormalize=bool(c.get("norm_topk_prob", False)),
        qk_norm=True,
        attention_bias=bool(c.get("attention_bias", False)),
        o_bias=bool(c.get("attention_bias", False)),
        dense_layers=_qwen_dense_layers(c),
    )


_BY_MODEL_TYPE = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe}


def config_from_dict(c: dict) -> ModelConfig:
    checkpoint_quantization(c)  # refuse a quantization the engine cannot compute before anything else
    arch = (c.get("architectures") or [""])[0]
    model_type = c.get("model_type", "")
    if arch in PANGU_ARCHITECTURES or model_type in PANGU_MODEL_TYPES:
        cfg = _pangu(c)
    elif model_type in _BY_MODEL_TYPE:
        cfg = _BY_MODEL_TYPE[model_type](c)
    else:
        raise UnsupportedModelError(
            f"model_type {model_type!r} / architecture {arch!r} is not supported; "
            f"supported: Pangu Pro MoE, {sorted(_BY_MODEL_TYPE)}"
        )
    return cfg


def read_config_dict(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    return json.loads(file.read_text())


def read_config(path: str | Path) -> ModelConfig:
    return config_from_dict(read_config_dict(path))
