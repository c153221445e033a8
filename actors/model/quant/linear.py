"""FP8 linear layers of the attention part: which ones, the module, and the swap into a MoGEModel.

FP8 (block-scaled, actors/model/quant/blocks.py): the attention projections, the shared expert and
dense MLP layers. Stay in the compute dtype: embeddings, norms, the router (and its learned scale),
the shared-expert gate, the LM head — small, or where the precision shows in every token.

A model is built on the meta device and its Linear modules at FP8 names are swapped for Fp8Linear
before the state dict is assigned (actors/weights/loader.py `build_model`), so model.py knows nothing
of FP8: an Fp8Linear takes x and returns F.linear(x, W, b) with W = q * scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actors.model import kernels
from actors.model.quant.blocks import BLOCK, FP8, BlockFp8, cdiv, dequantize

# Module names (suffixes of our state-dict names minus ".weight") whose weights may be FP8.
# "mlp.gate" (router) and "mlp.shared_expert_gate" do not end in any of these.
FP8_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SCALE_SUFFIX = "weight_scale_inv"  # HF's name, kept for our state dict too


def is_fp8_module(module_name: str) -> bool:
    return module_name.endswith(FP8_MODULES)


def is_fp8_weight(name: str) -> bool:
    """A state-dict name of a weight that FP8 applies to (e.g. layers.3.self_attn.q_proj.weight)."""
    return name.endswith(".weight") and is_fp8_module(name[: -len(".weight")])


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + SCALE_SUFFIX


class Fp8Linear(nn.Module):
    """y = x W^T + b with W block-scaled FP8: the Triton kernel on CUDA, else W dequantized per call
    (the torch fallback: what the kernel is checked against)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(cdiv(d_out, BLOCK), cdiv(d_in, BLOCK), dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(d_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fused(x):
            from actors.model.kernels.gemm.linear import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)
        w = dequantize(self.weight, self.weight_scale_inv, x.dtype)
        return F.linear(x, w, self.bias)

    def block_weight(self) -> BlockFp8:
        return BlockFp8(self.weight, self.weight_scale_inv)


def swap_in_fp8(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Replace each Linear whose weight in `state` is FP8 by an Fp8Linear of the same shape (on the
    model's device: meta before assignment). -> the swapped module names."""
    swapped = []
    for name, t in state.items():
        if t.dtype != FP8:
            continue
        module_name = name[: -len(".weight")]
        if not (name.endswith(".weight") and is_fp8_module(module_name)):
            raise ValueError(f"{name}: FP8 is not supported for this tensor")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        with torch.device(old.weight.device):
            new = Fp8Linear(old.weight.shape[1], old.weight.shape[0], bias=old.bias is not None)
        setattr(parent, child, new)
        swapped.append(module_name)
    return swapped
