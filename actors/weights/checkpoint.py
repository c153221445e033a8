"""Read an HF-format checkpoint directory: memory-mapped safetensors, only the tensors asked for.

Two parts are read separately: the attention part (everything but routed experts, for attention
replicas) and chosen expert groups (for expert workers). Sharded checkpoints are found through
model.safetensors.index.json or by scanning *.safetensors. Fused expert tensors are sliced on the
expert axis before they are read, so a group costs its own bytes only.

Shape legend: E = experts, Eg = experts in a group, I = expert intermediate size, D = hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from actors.weights import names as wn
from actors.model.experts import ExpertGroupWeights
from actors.weights.hf_config import read_config  # noqa: F401  (re-exported: checkpoint.read_config)
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


def load_attention_part(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    reader: CheckpointReader | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of MoGEModel (our names), read from the checkpoint, converted and placed."""
    reader = reader or CheckpointReader(path)
    out = {}
    shapes = attention_part_shapes(cfg)
    with _progress(len(shapes), "attention part") as bar:
        for name, shape in shapes.items():
            candidates = wn.hf_names(cfg, name)
            source = reader.first_present(candidates)
            if source is None and name.endswith("router_scale"):
                t = torch.ones(shape)  # a MoGE checkpoint without learned scales: scale 1
            elif source is None:
                raise CheckpointError(f"{reader.path}: missing tensor {candidates[0]!r}")
            else:
                t = reader.read(source)
                if name.endswith("router_scale"):
                    t = t.reshape(shape)  # Pangu stores it as [1, N]
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{source}: shape {list(t.shape)} but the config implies {list(shape)}")
            out[name] = t.to(device=device, dtype=dtype)
            bar.update()
    return out


def load_expert_groups(
    path: str | Path,
    cfg: ModelConfig,
    groups,
    dtype: torch.dtype,
    device: torch.device | str,
    reader: CheckpointReader | None = None,
) -> dict[int, ExpertGroupWeights]:
    """The routed experts of `groups` only; other groups' tensors are never read."""
    groups = sorted(set(groups))
    for g in groups:
        if not 0 <= g < cfg.n_groups:
            raise ValueError(f"group {g} out of range 0..{cfg.n_groups - 1}")
    reader = reader or CheckpointReader(path)
    moe_layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
    out = {g: ExpertGroupWeights(group=g, first_expert=cfg.experts_of_group(g).start) for g in groups}
    with _progress(len(moe_layers) * len(groups), "expert groups") as bar:
        for layer in moe_layers:
            fused = reader.first_present(wn.fused_names(cfg, layer)[0])
            for g in groups:
                experts = cfg.experts_of_group(g)
                if fused:
                    w13, w2 = _read_fused(reader, cfg, layer, experts, dtype, device)
                else:
                    w13, w2 = _read_per_expert(reader, cfg, layer, experts, dtype, device)
                out[g].w13[layer], out[g].w2[layer] = w13, w2
                bar.update()
    return out


def _read_per_expert(reader, cfg, layer, experts: range, dtype, device):
    eg, inner, d = len(experts), cfg.moe_intermediate_size, cfg.hidden_size
    w13 = torch.empty(eg, 2 * inner, d, dtype=dtype, device=device)  # [Eg, 2I, D]
    w2 = torch.empty(eg, d, inner, dtype=dtype, device=device)  # [Eg, D, I]
    for i, e in enumerate(experts):
        gate, up, down = wn.per_expert_names(cfg, layer, e)
        w13[i, :inner].copy_(_checked(reader.read(gate), (inner, d), gate))
        w13[i, inner:].copy_(_checked(reader.read(up), (inner, d), up))
        w2[i].copy_(_checked(reader.read(down), (d, inner), down))
    return w13, w2


def _read_fused(reader, cfg, layer, experts: range, dtype, device):
    eg, inner, d = len(experts), cfg.moe_intermediate_size, cfg.hidden_size
    gate_up_names, down_names = wn.fused_names(cfg, layer)
    gate_up, down = reader.first_present(gate_up_names), reader.first_present(down_names)
    if down is None:
        raise CheckpointError(f"layer {layer}: fused {gate_up} without a fused down_proj")
    rows = slice(experts.start, experts.stop)
    w13 = reader.read(gate_up, rows)
    w2 = reader.read(down, rows)
    # Writers differ in orientation; the shapes tell which one this is (D == 2I would be ambiguous
    # and is read as the transformers 5 layout).
    if tuple(w13.shape) == (eg, d, 2 * inner) and d != 2 * inner:
        w13 = w13.transpose(1, 2)
    if tuple(w2.shape) == (eg, inner, d) and d != inner:
        w2 = w2.transpose(1, 2)
    w13 = _checked(w13, (eg, 2 * inner, d), gate_up)
    w2 = _checked(w2, (eg, d, inner), down)
    return w13.to(device=device, dtype=dtype).contiguous(), w2.to(device=device, dtype=dtype).contiguous()


def _checked(t: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{name}: shape {list(t.shape)} but the config implies {list(shape)}")
    return t
