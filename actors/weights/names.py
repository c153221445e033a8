"""Tensor names in HF checkpoints, per family.

Our MoGEModel state dict uses the Qwen / Pangu names without the leading "model." (e.g.
"layers.3.mlp.gate.weight"); routed experts are not in it. This file maps both ways and names the
routed-expert tensors in the two layouts checkpoints use:
  per-expert  Mixtral  model.layers.{l}.block_sparse_moe.experts.{e}.w1/w3/w2.weight  (gate/up/down)
              others   model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight
  fused       model.layers.{l}.<moe>.experts.gate_up_proj [E, 2I, D] and .down_proj [E, D, I]
              (transformers 5 in-memory layout, where Mixtral's block is also called "mlp";
              some writers add ".weight")
Where writers disagree a name has several candidates; the reader takes the first present.
"""

from __future__ import annotations

from actors.model.config import ModelConfig


def moe_prefixes(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    blocks = ("block_sparse_moe", "mlp") if cfg.family == "mixtral" else ("mlp",)
    return tuple(f"model.layers.{layer}.{block}" for block in blocks)


def hf_names(cfg: ModelConfig, name: str) -> tuple[str, ...]:
    """Our state-dict name -> candidate checkpoint names."""
    if name == "lm_head.weight":
        return (name,)
    if cfg.family == "mixtral" and ".mlp.gate." in name:
        return ("model." + name.replace(".mlp.gate.", ".block_sparse_moe.gate."), "model." + name)
    return ("model." + name,)


def per_expert_names(cfg: ModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of one expert in the per-expert layout."""
    p = f"{moe_prefixes(cfg, layer)[0]}.experts.{expert}"
    if cfg.family == "mixtral":
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def fused_names(cfg: ModelConfig, layer: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Candidate names of (gate_up [E, 2I, D], down [E, D, I]) in the fused layout."""
    ps = [f"{prefix}.experts" for prefix in moe_prefixes(cfg, layer)]
    gate_up = tuple(n for p in ps for n in (f"{p}.gate_up_proj", f"{p}.gate_up_proj.weight"))
    down = tuple(n for p in ps for n in (f"{p}.down_proj", f"{p}.down_proj.weight"))
    return gate_up, down
