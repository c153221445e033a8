"""From the configuration to a running LLMEngine: load the model, size the KV cache, build.

KV budget, first that is set: engine.num_kv_blocks; engine.kv_cache_bytes; kv_cache_fraction of the
device memory free after the weights are loaded. Never more blocks than max_num_seqs sequences of
max_model_len tokens can use, so a CPU host's large free RAM does not turn into a huge zeroed cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.device import memory_free
from actors.engine import EngineSpec, LLMEngine
from actors.kv_cache import bytes_per_block
from actors.model_loader import LoadedModel, load_model

if TYPE_CHECKING:
    from cluster.config import MogeConfig


def kv_block_budget(config: "MogeConfig", loaded: LoadedModel, max_model_len: int) -> int:
    eng = config.engine
    per_seq = -(-max_model_len // eng.kv_block_size)
    useful = eng.max_num_seqs * per_seq
    if eng.num_kv_blocks is not None:
        return eng.num_kv_blocks
    per_block = bytes_per_block(loaded.cfg, eng.kv_block_size, loaded.dtype)
    budget = eng.kv_cache_bytes if eng.kv_cache_bytes is not None else int(memory_free(loaded.device) * eng.kv_cache_fraction)
    blocks = min(budget // per_block, useful)
    if blocks < per_seq:
        raise ValueError(
            f"the KV cache budget ({budget} bytes = {blocks} blocks of {per_block} bytes) cannot hold one "
            f"sequence of max_model_len={max_model_len} tokens ({per_seq} blocks); raise "
            "engine.kv_cache_bytes / engine.kv_cache_fraction or lower model.max_model_len"
        )
    return blocks


def build_engine(config: "MogeConfig", experts=None) -> tuple[LLMEngine, LoadedModel]:
    """`experts`: an ExpertCompute to use instead of local experts (remote expert workers)."""
    m = config.model
    loaded = load_model(m.source, m.dtype, m.device, n_groups=m.n_groups, seed=m.seed, experts=experts, name=m.name)
    max_model_len = m.max_model_len or loaded.cfg.max_position_embeddings
    spec = EngineSpec.from_config(config.engine, max_model_len, kv_block_budget(config, loaded, max_model_len))
    return LLMEngine(loaded, spec), loaded
