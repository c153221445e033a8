"""From plain settings to a running LLMEngine: load the model, size the KV cache, build.

The engine takes dataclasses, never the pydantic configuration (that stays at the edge:
cluster/serve/replica_engine.py converts it). KV budget, first that is set: num_kv_blocks;
kv_cache_bytes; kv_cache_fraction of the device memory free after the weights are loaded. Never more
blocks than max_num_seqs sequences of max_model_len tokens can use, so a CPU host's large free RAM
does not turn into a huge zeroed cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.device import memory_free
from actors.engine.engine import EngineSpec, LLMEngine
from actors.model import kernels
from actors.model.expert_compute import ExpertCompute
from actors.model.kv_cache import bytes_per_block
from actors.weights.loader import LoadedModel, load_model


@dataclass(frozen=True)
class LoadSpec:
    """What to load and where."""

    source: str
    dtype: str = "auto"
    device: str = "auto"
    n_groups: int | None = None
    seed: int = 0
    name: str | None = None
    max_model_len: int | None = None  # default: the model's


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches and how much KV cache it takes."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.3
    num_kv_blocks: int | None = None
    ping_pong: bool = False
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    cuda_graph_memory_mb: int = 4096
    batch_invariant: bool = False  # a row's logits do not depend on its batch (kernels/invariant.py)


def kv_block_budget(settings: EngineSettings, loaded: LoadedModel, max_model_len: int) -> int:
    per_seq = -(-max_model_len // settings.kv_block_size)
    useful = settings.max_num_seqs * per_seq
    if settings.num_kv_blocks is not None:
        return settings.num_kv_blocks
    per_block = bytes_per_block(loaded.cfg, settings.kv_block_size, loaded.dtype)
    if settings.kv_cache_bytes is not None:
        budget = settings.kv_cache_bytes
    else:
        budget = int(memory_free(loaded.device) * settings.kv_cache_fraction)
    blocks = min(budget // per_block, useful)
    if blocks < per_seq:
        raise ValueError(
            f"the KV cache budget ({budget} bytes = {blocks} blocks of {per_block} bytes) cannot hold one "
            f"sequence of max_model_len={max_model_len} tokens ({per_seq} blocks); raise "
            "engine.kv_cache_bytes / engine.kv_cache_fraction or lower model.max_model_len"
        )
    return blocks


def build_engine(
    load: LoadSpec, settings: EngineSettings, experts: ExpertCompute | None = None
) -> tuple[LLMEngine, LoadedModel]:
    """`experts`: an ExpertCompute to use instead of local experts (remote expert workers)."""
    kernels.set_batch_invariant(settings.batch_invariant)  # before any weight or kernel is touched
    loaded = load_model(
        load.source, load.dtype, load.device, n_groups=load.n_groups, seed=load.seed, experts=experts, name=load.name
    )
    max_model_len = load.max_model_len or loaded.cfg.max_position_embeddings
    spec = EngineSpec(
        max_model_len=max_model_len,
        num_kv_blocks=kv_block_budget(settings, loaded, max_model_len),
        block_size=settings.kv_block_size,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        ping_pong=settings.ping_pong,
        enable_prefix_caching=settings.enable_prefix_caching,
        cuda_graphs=settings.cuda_graphs,
        cuda_graph_memory_mb=settings.cuda_graph_memory_mb,
        batch_invariant=settings.batch_invariant,
    )
    return LLMEngine(loaded, spec), loaded
