"""Read an HF-format checkpoint directory: memory-mapped safetensors, only the tensors asked for.

Two parts are read separately: the attention part (everything but routed experts, for attention
replicas) and chosen expert groups (for expert workers). Sharded checkpoints are found through
model.safetensors.index.json or by scanning *.safetensors. Fused expert tensors are sliced on the
expert axis before they are read, so a group costs its own bytes only. FP8 checkpoints (actors/weights/quantization.py): each float8
weight is read with its block scales and kept FP8 or dequantized as the load's WeightPlan says.

Shape legend: E = experts, Eg = experts in a group, I = expert intermediate size, D = hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from actors.weights import names as wn
from actors.weights import quantization as q
from actors.model.experts import ExpertGroupWeights
from actors.model.quant.blocks import BLOCK, FP8, BlockFp8, cdiv, quantize, scale_rows
from actors.model.quant.linear import is_fp8_weight, scale_name
from actors.weights.hf_config import read_config, read_config_dict  # noqa: F401  (re-exported: checkpoint.read_config)
from actors.model.config import ModelConfig
from actors.weights.progress import LoadProgress


class CheckpointError(ValueError):
    pass


class CheckpointReader:
    """Name -> file index over a directory's safetensors, with byte accounting."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file_of = self._index()
        self._open: dict[str, object] = {}
        self.bytes_read = 0
        self.tensors_read: list[str] = []

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} has no *.safetensors files")
        out = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                out.update({name: file.name for name in f.keys()})
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def first_present(self, names) -> str | None:
        return next((n for n in names if n in self.file_of), None)

    def _handle(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.path / file), framework="pt")
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or rows of its first axis), memory-mapped on CPU."""
        f = self._handle(name)
        t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read.append(name)
        return t


def _progress(total: int, desc: str) -> LoadProgress:
    return LoadProgress(total, desc)


def attention_part_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    from actors.model.model import MoGEModel

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in MoGEModel(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def weight_plan(path: str | Path, dtype: torch.dtype, device: torch.device | str, quantization: str = "none") -> q.WeightPlan:
    """How a load of this checkpoint places its weights (refuses an unsupported quantization_config)."""
    ckpt = q.checkpoint_quantization(read_config_dict(path))
    return q.plan_weights(quantization, ckpt, dtype, torch.device(device))


def _raw(reader: CheckpointReader, name: str, plan: q.WeightPlan, rows: slice | None = None):
    """The stored weight: a tensor, or (q, scale) of an FP8 one (memory-mapped, CPU)."""
    t = reader.read(name, rows)
    try:
        if q.check_fp8(name, t, plan):
            return t, q.read_scale(reader, name, t, rows)
    except q.QuantizedTensorError as e:
        raise CheckpointError(str(e)) from None
    return t


def _stored_shape(raw) -> tuple:
    return tuple((raw[0] if isinstance(raw, tuple) else raw).shape)


def load_attention_part(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    reader: CheckpointReader | None = None,
    plan: q.WeightPlan | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of MoGEModel (our names), read from the checkpoint, converted and placed. With FP8
    kept, an FP8 linear's entry is its float8 weight plus `<module>.weight_scale_inv`."""
    reader = reader or CheckpointReader(path)
    plan = plan or weight_plan(path, dtype, device)
    out = {}
    shapes = attention_part_shapes(cfg)
    with _progress(len(shapes), "attention part") as bar:
        for name, shape in shapes.items():
            candidates = wn.hf_names(cfg, name)
            source = reader.first_present(candidates)
            if source is None and name.endswith("router_scale"):
                t = torch.ones(shape).to(device=plan.device, dtype=plan.dtype)  # no learned scales: 1
            elif source is None:
                raise CheckpointError(f"{reader.path}: missing tensor {candidates[0]!r}")
            else:
                raw = _raw(reader, source, plan)
                if name.endswith("router_scale"):
                    raw = raw.reshape(shape)  # Pangu stores it as [1, N]
                if _stored_shape(raw) != tuple(shape):
                    raise CheckpointError(f"{source}: shape {list(_stored_shape(raw))} but the config implies {list(shape)}")
                t = q.place(raw, plan, is_fp8_weight(name))
            if isinstance(t, BlockFp8):
                out[name], out[scale_name(name)] = t.q, t.scale
            else:
                out[name] = t
            bar.update()
    return out


def load_expert_groups(
    path: str | Path,
    cfg: ModelConfig,
    groups,
    dtype: torch.dtype,
    device: torch.device | str,
    reader: CheckpointReader | None = None,
    plan: q.WeightPlan | None = None,
) -> dict[int, ExpertGroupWeights]:
    """The routed experts of `groups` only; other groups' tensors are never read. Default plan:
    everything in `dtype` (FP8 checkpoints dequantized)."""
    groups = sorted(set(groups))
    for g in groups:
        if not 0 <= g < cfg.n_groups:
            raise ValueError(f"group {g} out of range 0..{cfg.n_groups - 1}")
    reader = reader or CheckpointReader(path)
    plan = plan or weight_plan(path, dtype, device)
    moe_layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
    out = {g: ExpertGroupWeights(group=g, first_expert=cfg.experts_of_group(g).start) for g in groups}
    with _progress(len(moe_layers) * len(groups), "expert groups") as bar:
        for layer in moe_layers:
            fused = reader.first_present(wn.fused_names(cfg, layer)[0])
            for g in groups:
                experts = cfg.experts_of_group(g)
                if fused:
                    w13, w2 = _read_fused(reader, cfg, layer, experts, plan)
                else:
                    w13, w2 = _read_per_expert(reader, cfg, layer, experts, plan)
                out[g].w13[layer], out[g].w2[layer] = w13, w2
                bar.update()
    return out


def _read_per_expert(reader, cfg, layer, experts: range, plan: q.WeightPlan):
    eg, inner, d = len(experts), cfg.moe_intermediate_size, cfg.hidden_size
    raws = []
    for e in experts:
        gate, up, down = wn.per_expert_names(cfg, layer, e)
        raws.append([(_raw(reader, n, plan), n, shape) for n, shape in ((gate, (inner, d)), (up, (inner, d)), (down, (d, inner)))])
    for raw, n, shape in (r for exp in raws for r in exp):
        _checked_shape(_stored_shape(raw), shape, n)
    if plan.fp8 and all(isinstance(raw, tuple) for exp in raws for raw, _, _ in exp):
        return _stack_fp8(raws, eg, inner, d, plan.device)
    w13 = torch.empty(eg, 2 * inner, d, dtype=plan.dtype, device=plan.device)  # [Eg, 2I, D]
    w2 = torch.empty(eg, d, inner, dtype=plan.dtype, device=plan.device)  # [Eg, D, I]
    for i, ((gate, _, _), (up, _, _), (down, _, _)) in enumerate(raws):
        w13[i, :inner].copy_(q.place(gate, plan, False))
        w13[i, inner:].copy_(q.place(up, plan, False))
        w2[i].copy_(q.place(down, plan, False))
    if plan.quantize_float:  # a float checkpoint quantized at load, gate and up on their own grids
        return quantize(w13, split=inner), quantize(w2)
    return w13, w2


def _stack_fp8(raws, eg: int, inner: int, d: int, device) -> tuple[BlockFp8, BlockFp8]:
    """Per-expert FP8 gate/up/down as stored -> w13 (gate rows, then up rows: two block grids) and w2."""
    gi = scale_rows(inner)
    q13 = torch.empty(eg, 2 * inner, d, dtype=FP8, device=device)
    s13 = torch.empty(eg, 2 * gi, cdiv(d, BLOCK), dtype=torch.float32, device=device)
    q2 = torch.empty(eg, d, inner, dtype=FP8, device=device)
    s2 = torch.empty(eg, scale_rows(d), cdiv(inner, BLOCK), dtype=torch.float32, device=device)
    for i, ((gate, _, _), (up, _, _), (down, _, _)) in enumerate(raws):
        q13[i, :inner].copy_(gate[0])
        q13[i, inner:].copy_(up[0])
        s13[i, :gi].copy_(gate[1])
        s13[i, gi:].copy_(up[1])
        q2[i].copy_(down[0])
        s2[i].copy_(down[1])
    return BlockFp8(q13, s13, inner), BlockFp8(q2, s2, 0)


def _read_fused(reader, cfg, layer, experts: range, plan: q.WeightPlan):
    eg, inner, d = len(experts), cfg.moe_intermediate_size, cfg.hidden_size
    gate_up_names, down_names = wn.fused_names(cfg, layer)
    gate_up, down = reader.first_present(gate_up_names), reader.first_present(down_names)
    if down is None:
        raise CheckpointError(f"layer {layer}: fused {gate_up} without a fused down_proj")
    rows = slice(experts.start, experts.stop)
    w13 = _oriented(_raw(reader, gate_up, plan, rows), (eg, 2 * inner, d), gate_up)
    w2 = _oriented(_raw(reader, down, plan, rows), (eg, d, inner), down)
    if plan.fp8 and isinstance(w13, tuple) and isinstance(w2, tuple):
        # quantized as one [2I, D] grid by its writer: kept so (split 0), no re-quantization
        return tuple(BlockFp8(*(t.to(plan.device).contiguous() for t in w), 0) for w in (w13, w2))
    w13 = q.place(w13, plan, False).contiguous()
    w2 = q.place(w2, plan, False).contiguous()
    if plan.quantize_float:
        return quantize(w13, split=inner), quantize(w2)
    return w13, w2


def _oriented(raw, shape: tuple, name: str):
    """Writers differ in orientation ([E, D, 2I] or [E, 2I, D]); the shapes tell which one this is (D ==
    2I would be ambiguous and is read as the transformers 5 layout). FP8 scales turn with their
    weight (square blocks)."""
    eg, rows, cols = shape
    stored = _stored_shape(raw)
    if stored == (eg, cols, rows) and rows != cols:
        raw = tuple(t.transpose(1, 2) for t in raw) if isinstance(raw, tuple) else raw.transpose(1, 2)
    _checked_shape(_stored_shape(raw), shape, name)
    return raw


def _checked_shape(got: tuple, shape: tuple, name: str) -> None:
    if tuple(got) != tuple(shape):
        raise CheckpointError(f"{name}: shape {list(got)} but the config implies {list(shape)}")
