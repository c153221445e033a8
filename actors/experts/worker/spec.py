"""What an expert worker is, before it runs: the model config a spec names, the Ray options that pin
it to one device, the node address it binds, and where its groups' weights come from (and go to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from actors.model.config import ModelConfig
from actors.model.experts import ExpertGroupWeights
from actors.model.presets import get_preset

PRESET_PREFIX = "preset:"


def model_config_of(spec: dict) -> ModelConfig:
    """The ModelConfig a model_spec describes (only config.json is read for a directory)."""
    source = spec["source"]
    if source.startswith(PRESET_PREFIX):
        cfg = get_preset(source[len(PRESET_PREFIX):])
    else:
        from actors.weights.checkpoint import read_config

        cfg = read_config(Path(source))
    n_groups = spec.get("n_groups")
    return cfg.with_groups(n_groups) if n_groups else cfg


def worker_options(
    device_kind: str,
    num_gpus: float = 1,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    name: str | None = None,
    namespace: str | None = None,
    max_concurrency: int = 8,
) -> dict[str, Any]:
    """Ray `.options(...)` that pin one worker to one device of `device_kind`.

    cuda: num_gpus (1 = a whole GPU; <1 shares one, for small GPUs and tests).
    npu:  resources={"NPU": num_gpus}; Ray's NPU accelerator manager sets ASCEND_RT_VISIBLE_DEVICES.
    cpu:  a CPU slot of num_cpus (fractions let tests pack several workers on a 2-core machine).
    max_concurrency > 1 so ping/stats answer while a group loads; compute is thread-safe.
    """
    if device_kind not in ("cuda", "npu", "cpu"):
        raise ValueError(f"unknown device kind {device_kind!r}; expected cuda, npu or cpu")
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": max_concurrency, "max_restarts": 0}
    extra = dict(resources or {})
    if device_kind == "cuda":
        if num_gpus <= 0:
            raise ValueError("a cuda expert worker needs num_gpus > 0")
        opts["num_gpus"] = num_gpus
    elif device_kind == "npu":
        extra.setdefault("NPU", num_gpus if num_gpus > 0 else 1)
    if extra:
        opts["resources"] = extra
    if name is not None:
        opts.update(name=name, get_if_exists=True, lifetime="detached")
        if namespace is not None:
            opts["namespace"] = namespace
    return opts


def node_ip() -> str:
    """The address this process's servers bind and advertise: its Ray node's, else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a single host
        pass
    return "127.0.0.1"


def groups_from_source(spec: dict, cfg: ModelConfig, groups: list[int], dtype: torch.dtype,
                       device: torch.device) -> dict[int, ExpertGroupWeights]:
    """`groups` from the checkpoint (memory-mapped safetensors) or regenerated from the preset."""
    source = spec["source"]
    if source.startswith(PRESET_PREFIX):
        from actors.weights.loader import random_expert_groups

        return random_expert_groups(cfg, groups, int(spec.get("seed", 0)), dtype, device)
    from actors.weights.checkpoint import load_expert_groups

    return load_expert_groups(Path(source), cfg, groups, dtype, device)


def export_weights(w: ExpertGroupWeights) -> dict:
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731 - the object store and gRPC both want host memory
    return {
        "group": w.group,
        "first_expert": w.first_expert,
        "w13": {layer: cpu(t) for layer, t in w.w13.items()},
        "w2": {layer: cpu(t) for layer, t in w.w2.items()},
    }
