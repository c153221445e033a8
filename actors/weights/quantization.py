"""Quantized checkpoints and `model.quantization`: what the engine accepts, and how each weight is
placed (kept FP8, dequantized, or quantized at load).

Accepted checkpoint format: HF "fp8" (transformers' FineGrainedFP8Config, as in Qwen3-*-FP8 and
DeepSeek-V3): float8_e4m3fn weights, each with a `weight_scale_inv` of one scale per 128x128 block
(float32, or power-of-two ue8m0), W = q * scale (actors/model/quant/blocks.py). Which tensors are FP8
is read from the tensors themselves, so `modules_to_not_convert` / `ignored_layers` (kept in bf16) and
FP8 tensors the engine keeps in the compute dtype (router, embeddings: dequantized) both just work.
`activation_scheme` "dynamic", or "static" (the activation scales of the checkpoint are not used:
activations are quantized dynamically per token group instead, the weights are exactly as stored).

Refused with UnsupportedQuantizationError, before any weight is read, never served wrong: another
quant_method (gptq, awq, compressed-tensors, bitsandbytes, mxfp4, ...), a block size other than
[128, 128] or per-tensor scales, fmt other than e4m3, FP4 experts, an unknown scale format or
activation scheme. While reading: an FP8 tensor without its scale, a scale of the wrong shape, FP8
tensors in a checkpoint that declares no quantization, float8_e5m2 weights (CheckpointError).

`model.quantization` (QUANTIZATIONS):
    auto  FP8 checkpoints keep FP8 on a GPU with FP8 (compute capability 8.9+), are dequantized to
          the compute dtype elsewhere (CPU, older GPUs, NPU); other checkpoints and presets as they are
    none  every weight in the compute dtype (FP8 checkpoints dequantized)
    fp8   the attention projections, shared experts, dense MLPs and routed experts in FP8: FP8
          checkpoints as stored (their float tensors stay float), bf16 ones and presets quantized at
          load tensor by tensor (the peak never holds the bf16 model). On CPU the FP8 weights are kept and computed by the torch
          fallback (dequantized per use): slow, for tests of the same construction path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from actors.model.quant.blocks import BLOCK, FP8, BlockFp8, cdiv, dequantize, quantize, scale_rows
from actors.weights.hf_config import CheckpointQuant, UnsupportedQuantizationError, checkpoint_quantization  # noqa: F401

QUANTIZATIONS = ("auto", "none", "fp8")
FP8_DTYPES = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2",
                                                                  "float8_e4m3fnuz", "float8_e5m2fnuz")) if d)
log = logging.getLogger(__name__)


class QuantizedTensorError(ValueError):
    """An FP8 tensor the checkpoint cannot be read correctly with (raised as CheckpointError)."""


def fp8_device(device: torch.device) -> bool:
    """Can the FP8 kernels run here? CUDA with e4m3 support (Ada / Hopper and newer) and Triton."""
    if device.type != "cuda":
        return False
    from actors.model import kernels

    return kernels.triton_available() and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class WeightPlan:
    """How one load places weights."""

    dtype: torch.dtype  # compute dtype
    device: torch.device
    fp8: bool = False  # FP8-capable tensors kept (FP8 sources) or quantized (others) in FP8
    checkpoint: CheckpointQuant | None = None
    notes: list = field(default_factory=list, compare=False)

    @property
    def quantize_float(self) -> bool:
        """Quantize float weights at load? Only for an unquantized source: in an FP8 checkpoint the
        float ones were left so on purpose (modules_to_not_convert) and stay in the compute dtype."""
        return self.fp8 and self.checkpoint is None

    @property
    def label(self) -> str:
        return "fp8" if self.fp8 else "none"


def plan_weights(quantization: str, ckpt: CheckpointQuant | None, dtype: torch.dtype, device: torch.device) -> WeightPlan:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    if quantization == "fp8" and device.type == "cuda" and not fp8_device(device):
        raise UnsupportedQuantizationError(
            "model.quantization fp8 needs a GPU with FP8 (compute capability 8.9+) and Triton; "
            "use quantization none (FP8 checkpoints are then dequantized)"
        )
    if quantization == "fp8" and device.type not in ("cuda", "cpu"):
        raise UnsupportedQuantizationError(f"model.quantization fp8 is not supported on {device.type}")
    if quantization == "auto":
        fp8 = ckpt is not None and fp8_device(device)
        if ckpt is not None and not fp8:
            log.info("FP8 checkpoint on %s: dequantized to %s at load", device, dtype)
    else:
        fp8 = quantization == "fp8"
    return WeightPlan(dtype, device, fp8, ckpt)


def scale_candidates(weight_name: str) -> tuple[str, ...]:
    """Checkpoint names of the block scales of `weight_name`."""
    if weight_name.endswith(".weight"):
        return (weight_name + "_scale_inv",)
    return (weight_name + "_scale_inv", weight_name + "_scales_inv")  # fused experts (older transformers: _scales_inv)


def read_scale(reader, weight_name: str, q: torch.Tensor, rows=None, split: int = 0) -> torch.Tensor:
    """The float32 block scales of the FP8 tensor q read as `weight_name` (the same `rows` slice)."""
    source = reader.first_present(scale_candidates(weight_name))
    if source is None:
        raise QuantizedTensorError(f"{weight_name} is float8 but its scale {scale_candidates(weight_name)[0]!r} "
                                   "is missing: the weights cannot be dequantized")
    s = reader.read(source, rows)
    if s.dtype == torch.uint8 or not s.dtype.is_floating_point:
        raise QuantizedTensorError(f"{source}: scales of dtype {s.dtype} are not supported (float32 or ue8m0)")
    *lead, n, k = q.shape
    want = (*lead, scale_rows(n, split), cdiv(k, BLOCK))
    if tuple(s.shape) != want:
        raise QuantizedTensorError(f"{source}: scale shape {list(s.shape)}, but a {list(q.shape)} weight in "
                                   f"128x128 blocks needs {list(want)}")
    return s.float()


def check_fp8(name: str, t: torch.Tensor, plan: WeightPlan) -> bool:
    """Is t an FP8 weight this load can read? Raises for FP8 kinds the engine cannot compute."""
    if t.dtype not in FP8_DTYPES:
        return False
    if t.dtype != FP8:
        raise QuantizedTensorError(f"{name}: {t.dtype} weights are not supported (only float8_e4m3fn)")
    if plan.checkpoint is None:
        raise QuantizedTensorError(f"{name} is {t.dtype} but config.json declares no quantization_config: "
                                   "its scales and format are unknown")
    return True


def place(t, plan: WeightPlan, fp8_ok: bool, split: int = 0):
    """A weight read from a checkpoint (tensor, or (q, scale) of an FP8 one) -> what the model holds:
    BlockFp8 on the device where the plan keeps FP8 for this tensor, else the compute dtype."""
    if isinstance(t, tuple):
        q, s = t
        if plan.fp8 and fp8_ok:
            return BlockFp8(q.to(plan.device), s.to(plan.device), split)
        work = plan.device if plan.device.type == "cuda" else "cpu"  # dequantize where it is fast
        return dequantize(q.to(work), s.to(work), plan.dtype, split).to(plan.device)
    t = t.to(device=plan.device, dtype=plan.dtype)
    return quantize(t, split) if plan.quantize_float and fp8_ok else t
