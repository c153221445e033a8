"""Build a ready model from a preset name or an HF-format checkpoint directory.

`source` is `preset:<name>` (random weights from a fixed seed, byte tokenizer) or a directory
(config.json + *.safetensors + tokenizer files). The attention part (everything but the routed
experts) lives in the MoGEModel; the routed experts are ExpertGroupWeights behind an ExpertCompute,
so a replica whose experts are remote passes `experts=` and loads no expert tensors at all.

`quantization` (actors/weights/quantization.py): "auto", "none" or "fp8". FP8 weights are block-scaled
(actors/model/quant/): the model's FP8 linears are Fp8Linear modules swapped in before the state is
assigned, routed experts BlockFp8 tensors in their ExpertGroupWeights. Presets with "fp8" are made
and quantized tensor by tensor (each expert group per layer), so the peak never holds the bf16 model.

Random preset weights are generated per tensor from a seed derived from (seed, name) — and for the
experts from (seed, layer, group) — so a process that builds only some groups gets exactly the
tensors a full build would. They are generated on the target device's generator (cuda: CUDA
generator, else CPU), so values are reproducible per device kind.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.device import resolve_device, resolve_dtype
from actors.model.expert_compute import ExpertCompute
from actors.model.experts import ExpertGroupWeights
from actors.model.local_experts import LocalExperts
from actors.model.model import MoGEModel
from actors.model.config import ModelConfig
from actors.model.presets import get_preset
from actors.model.quant.blocks import quantize
from actors.model.quant.linear import is_fp8_weight, scale_name, swap_in_fp8
from actors.weights.quantization import WeightPlan, plan_weights
from actors.weights.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

PRESET_PREFIX = "preset:"
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: MoGEModel
    cfg: ModelConfig
    tokenizer: Tokenizer
    name: str
    expert_groups: dict[int, ExpertGroupWeights] = field(default_factory=dict)
    source: str = ""
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attention_bytes: int = 0  # bytes of the attention part (embeddings, attention, router, shared, head)
    quantization: str = "none"  # "fp8": FP8 weights kept (attention projections, shared, routed experts)

    @property
    def expert_bytes(self) -> int:
        return sum(g.nbytes for g in self.expert_groups.values())

    @property
    def bytes_loaded(self) -> int:
        return self.attention_bytes + self.expert_bytes


def _seed(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen_device = "cuda" if device.type == "cuda" else "cpu"
    return torch.Generator(device=gen_device).manual_seed(seed)


def _randn(shape, std: float, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = _generator(device, seed)
    t = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32) * std
    return t.to(device=device, dtype=dtype)


def _random_tensor(name: str, shape: torch.Size, seed: int, dtype, device) -> torch.Tensor:
    """Std chosen so activations stay O(1): unit-variance inputs through 1/sqrt(fan_in) weights."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith("router_scale"):
        gen = _generator(device, _seed(seed, name))
        u = torch.rand(shape, generator=gen, device=gen.device)
        return (0.5 + u).to(device=device, dtype=dtype)  # in [0.5, 1.5): visibly non-trivial
    if name.endswith("bias"):
        return _randn(shape, 0.02, _seed(seed, name), dtype, device)
    if name == "embed_tokens.weight":
        return _randn(shape, 1.0, _seed(seed, name), dtype, device)
    return _randn(shape, shape[-1] ** -0.5, _seed(seed, name), dtype, device)


def random_attention_part(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device,
                          fp8: bool = False) -> dict[str, torch.Tensor]:
    """Random state dict of a MoGEModel (everything but routed experts); with fp8 the FP8 linears'
    weights are quantized as they are made (weight + weight_scale_inv entries)."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in MoGEModel(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    out = {}
    for name, shape in shapes.items():
        t = _random_tensor(name, shape, seed, dtype, device)
        if fp8 and is_fp8_weight(name):
            b = quantize(t)
            del t
            out[name], out[scale_name(name)] = b.q, b.scale
        else:
            out[name] = t
    return out


def random_expert_groups(
    cfg: ModelConfig,
    groups,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fp8: bool = False,
) -> dict[int, ExpertGroupWeights]:
    """Random routed experts of `groups`; group g's tensors depend only on (seed, layer, g). With fp8
    each (layer, group) tensor is quantized as soon as it is made (w13: gate and up on their own
    block grids, as a per-expert FP8 checkpoint stores them)."""
    device = torch.device(device)
    eg, inner, d = cfg.experts_per_group, cfg.moe_intermediate_size, cfg.hidden_size
    out = {}
    for g in sorted(groups):
        if not 0 <= g < cfg.n_groups:
            raise ValueError(f"group {g} out of range 0..{cfg.n_groups - 1}")
        weights = ExpertGroupWeights(group=g, first_expert=cfg.experts_of_group(g).start)
        for layer in range(cfg.num_layers):
            if cfg.is_moe_layer(layer):
                w13 = _randn((eg, 2 * inner, d), d**-0.5, _seed(seed, "w13", layer, g), dtype, device)
                weights.w13[layer] = quantize(w13, split=inner) if fp8 else w13
                del w13
                w2 = _randn((eg, d, inner), inner**-0.5, _seed(seed, "w2", layer, g), dtype, device)
                weights.w2[layer] = quantize(w2) if fp8 else w2
                del w2
        out[g] = weights
    return out


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], experts: ExpertCompute | None) -> MoGEModel:
    """A MoGEModel holding exactly `state` (no second copy, no init pass). FP8 weights in `state`
    (float8 `.weight` + `.weight_scale_inv`) turn their Linear into an Fp8Linear."""
    with torch.device("meta"):
        model = MoGEModel(cfg, experts)
        swap_in_fp8(model, state)
    if cfg.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.choose_kernels()  # fused or torch, decided once the weights are where they will run
    return model.eval()


def _state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _tokenizer_for_dir(path: Path, cfg: ModelConfig) -> Tokenizer:
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    # Weights without a tokenizer (tests, benchmarks): ids still work, text is bytes.
    log.warning("%s has no tokenizer.json; falling back to the byte tokenizer", path)
    eos = cfg.eos_token_ids or ByteTokenizer().eos_token_ids
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else ByteTokenizer().bos_token_id
    return ByteTokenizer(cfg.vocab_size, bos, tuple(eos))


def load_model(
    source: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    n_groups: int | None = None,
    seed: int = 0,
    experts: ExpertCompute | None = None,
    groups=None,
    name: str | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    """Load `source`. With `experts` given no expert tensors are read; otherwise `groups` (default:
    all) are loaded and served by a LocalExperts."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source.startswith(PRESET_PREFIX):
        preset = source[len(PRESET_PREFIX) :]
        cfg = get_preset(preset)
        if n_groups is not None:
            cfg = cfg.with_groups(n_groups)
        return build_preset(cfg, name or preset, source, seed, dt, dev, experts, groups, quantization)
    from actors.weights import checkpoint

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"model source {source!r} is neither 'preset:<name>' nor a directory")
    cfg = checkpoint.read_config(path)
    if n_groups is not None:
        cfg = cfg.with_groups(n_groups)
    reader = checkpoint.CheckpointReader(path)
    plan = checkpoint.weight_plan(path, dt, dev, quantization)
    state = checkpoint.load_attention_part(path, cfg, dt, dev, reader, plan)
    wanted = range(cfg.n_groups) if groups is None else groups
    held = {} if experts is not None else checkpoint.load_expert_groups(path, cfg, wanted, dt, dev, reader, plan)
    tokenizer = _tokenizer_for_dir(path, cfg)
    return _assemble(cfg, state, held, experts, tokenizer, name or path.name, source, plan)


def build_preset(
    cfg: ModelConfig,
    name: str,
    source: str = "",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    experts: ExpertCompute | None = None,
    groups=None,
    quantization: str = "auto",
) -> LoadedModel:
    """A preset shape with random weights made on `device` (no disk); with quantization fp8 each tensor
    is quantized as it is made. `load_model("preset:<name>")` comes here, and so may a test's scaled
    copy of a preset: the same construction path."""
    device = torch.device(device)
    plan = plan_weights(quantization, None, dtype, device)
    state = random_attention_part(cfg, seed, dtype, device, plan.fp8)
    wanted = range(cfg.n_groups) if groups is None else groups
    held = {} if experts is not None else random_expert_groups(cfg, wanted, seed, dtype, device, plan.fp8)
    return _assemble(cfg, state, held, experts, ByteTokenizer(cfg.vocab_size), name, source, plan)


def _assemble(cfg, state, held, experts, tokenizer, label, source, plan: WeightPlan) -> LoadedModel:
    model = build_model(cfg, state, experts if experts is not None else LocalExperts(cfg, held))
    return LoadedModel(model, cfg, tokenizer, label, held, source, plan.dtype, plan.device, _state_bytes(state), plan.label)


def dequantized(loaded: LoadedModel, dtype: torch.dtype | None = None) -> LoadedModel:
    """The same model with every FP8 weight dequantized to `dtype` (default the compute dtype): the
    reference an FP8 model is checked against. Costs the dense model's memory."""
    from actors.model.quant.blocks import as_dense, dequantize
    from actors.model.quant.linear import SCALE_SUFFIX

    dtype = dtype or loaded.dtype
    state = loaded.model.state_dict()
    if loaded.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dense = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name[: -len("weight")] + SCALE_SUFFIX) if name.endswith(".weight") else None
        dense[name] = dequantize(t, scale, dtype) if scale is not None else t.to(dtype)
    groups = {
        g: ExpertGroupWeights(w.group, w.first_expert,
                              {layer: as_dense(t, dtype) for layer, t in w.w13.items()},
                              {layer: as_dense(t, dtype) for layer, t in w.w2.items()})
        for g, w in loaded.expert_groups.items()
    }
    model = build_model(loaded.cfg, dense, LocalExperts(loaded.cfg, groups))
    return LoadedModel(model, loaded.cfg, loaded.tokenizer, loaded.name, groups, loaded.source, dtype,
                       loaded.device, _state_bytes(dense), "none")
