"""From plain settings to a running LLMEngine: load the model, size the KV cache, build.

The engine takes dataclasses, never the pydantic configuration (that stays at the edge:
cluster/replica/assemble.py converts it). KV budget, first that is set: num_kv_blocks;
kv_cache_bytes; kv_cache_fraction of the device memory free after the weights are loaded; else, on
an accelerator, the whole device as vLLM's gpu_memory_utilization does it:

    KV = gpu_memory_utilization x total - in use (weights, runtime, anything else there)
         - activation peak of the largest step (profiled now) - CUDA graphs (estimated: the same peak,
         which the largest captured step holds in the graphs' pool)

and on a CPU 0.3 of the free host memory. Never more blocks than max_num_seqs sequences of
max_model_len tokens can use, so a large free memory does not turn into a huge zeroed cache. The log
says what went where; after capture the graphs' real size is logged against the estimate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from actors.device import memory_free, memory_total, synchronize
from actors.engine.engine import EngineSpec, LLMEngine
from actors.model import kernels
from actors.engine.sampling.grammar import GrammarLimits
from actors.model.expert_compute import ExpertCompute
from actors.model.kv_cache import PagedKVCache, bytes_per_block
from actors.model.step_batch import StepBatch
from actors.weights.loader import LoadedModel, load_model

log = logging.getLogger(__name__)
GIB = 2**30
CPU_KV_FRACTION = 0.3


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
    quantization: str = "auto"  # auto | none | fp8 (actors/weights/quantization.py)


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches and how much KV cache it takes."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None  # of free memory; overrides gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    ping_pong: bool = False
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    cuda_graph_memory_mb: int = 4096
    batch_invariant: bool = False  # a row's logits do not depend on its batch (kernels/invariant.py)
    grammar: GrammarLimits = GrammarLimits()
    async_scheduling: bool | None = None
    step_cost_ratio: float = 1.5


def kv_block_budget(settings: EngineSettings, loaded: LoadedModel, max_model_len: int) -> tuple[int, int]:
    """-> (KV blocks, bytes set aside for CUDA graphs: 0 unless the utilisation rule sized the KV)."""
    per_seq = -(-max_model_len // settings.kv_block_size)
    useful = settings.max_num_seqs * per_seq
    if settings.num_kv_blocks is not None:
        return settings.num_kv_blocks, 0
    per_block = bytes_per_block(loaded.cfg, settings.kv_block_size, loaded.dtype)
    graphs = 0
    if settings.kv_cache_bytes is not None:
        budget = settings.kv_cache_bytes
    elif settings.kv_cache_fraction is not None or loaded.device.type == "cpu":
        fraction = settings.kv_cache_fraction if settings.kv_cache_fraction is not None else CPU_KV_FRACTION
        budget = int(memory_free(loaded.device) * fraction)
    else:
        budget, graphs = device_budget(settings, loaded, max_model_len)
    blocks = min(budget // per_block, useful)
    if blocks < per_seq:
        raise ValueError(
            f"the KV cache budget ({budget} bytes = {blocks} blocks of {per_block} bytes) cannot hold one "
            f"sequence of max_model_len={max_model_len} tokens ({per_seq} blocks); raise "
            "engine.gpu_memory_utilization (or kv_cache_bytes / kv_cache_fraction) or lower model.max_model_len"
        )
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB; %d sequences of max_model_len would use %d)",
             blocks, settings.kv_block_size, blocks * per_block / GIB, settings.max_num_seqs, useful)
    return blocks, graphs


def device_budget(settings: EngineSettings, loaded: LoadedModel, max_model_len: int) -> tuple[int, int]:
    """(KV bytes, graph reserve bytes) from gpu_memory_utilization of the whole device (module doc)."""
    device = loaded.device
    peak = activation_peak(loaded, settings, max_model_len)
    graphs = peak if settings.cuda_graphs and device.type == "cuda" else 0
    total, free = memory_total(device), memory_free(device)
    in_use = total - free
    budget = int(settings.gpu_memory_utilization * total) - in_use - peak - graphs
    log.info("KV budget: %.2f GiB = %.2f x %.2f GiB total - %.2f GiB in use (weights %.2f GiB, runtime and "
             "others) - %.2f GiB activation peak (%d-token step) - %.2f GiB CUDA graphs (estimate)",
             budget / GIB, settings.gpu_memory_utilization, total / GIB, in_use / GIB, loaded_bytes(loaded) / GIB,
             peak / GIB, max(settings.max_num_batched_tokens, settings.max_num_seqs), graphs / GIB)
    return max(0, budget), graphs


def loaded_bytes(loaded: LoadedModel) -> int:
    seen, n = set(), 0
    for t in list(loaded.model.parameters()) + list(loaded.model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n + loaded.model.experts.nbytes


@torch.no_grad()
def activation_peak(loaded: LoadedModel, settings: EngineSettings, max_model_len: int) -> int:
    """Device bytes the largest step allocates beyond the weights: one forward of max_num_batched_tokens
    tokens over a scratch KV cache, then the sampler's widest pass (top-p sorts [max_num_seqs, V])."""
    device, cfg = loaded.device, loaded.cfg
    if device.type != "cuda":
        return 0
    from actors.engine.sampler import apply_top_k_top_p

    tokens = max(settings.max_num_batched_tokens, settings.max_num_seqs)
    bs = settings.kv_block_size
    per_seq = max(1, min(tokens, max_model_len - 1))
    counts = [per_seq] * (tokens // per_seq) + ([tokens % per_seq] if tokens % per_seq else [])
    width = -(-per_seq // bs)
    kv = PagedKVCache.for_model(cfg, width * len(counts), bs, loaded.dtype, device)
    kv.max_seq_len = max_model_len
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    long = dict(dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, **long) for n in counts])
    seq_of = torch.repeat_interleave(torch.arange(len(counts), **long), torch.tensor(counts, device=device))
    tables = torch.arange(width * len(counts), **long).view(len(counts), width)
    batch = StepBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (tokens,), **long),
        positions=positions,
        query_start=torch.tensor(starts, **long),
        context_lens=torch.tensor(counts, **long),
        block_tables=tables,
        slot_mapping=tables[seq_of, positions // bs] * bs + positions % bs,
        logits_index=torch.tensor(starts[1:], **long) - 1,
        max_query=max(counts),
    )
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loaded.model(batch, kv)
    logits = torch.randn(settings.max_num_seqs, cfg.vocab_size, device=device)
    k = torch.full((settings.max_num_seqs,), 50, **long)
    apply_top_k_top_p(logits, k, torch.full((settings.max_num_seqs,), 0.9, device=device)).log_softmax(-1)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, batch, logits
    torch.cuda.empty_cache()
    return peak


def build_engine(
    load: LoadSpec, settings: EngineSettings, experts: ExpertCompute | None = None
) -> tuple[LLMEngine, LoadedModel]:
    """`experts`: an ExpertCompute to use instead of local experts (remote expert workers)."""
    kernels.set_batch_invariant(settings.batch_invariant)  # before any weight or kernel is touched
    loaded = load_model(
        load.source, load.dtype, load.device, n_groups=load.n_groups, seed=load.seed, experts=experts, name=load.name,
        quantization=load.quantization,
    )
    if settings.batch_invariant and loaded.quantization != "none":
        # the invariant kernels (kernels/invariant*.py) take bf16/fp32 weights only; serving FP8 with
        # the default kernels would break the promise silently
        raise ValueError(f"engine.batch_invariant does not cover {loaded.quantization} weights yet: "
                         "serve this checkpoint with batch_invariant off, or a bf16 checkpoint invariant")
    max_model_len = load.max_model_len or loaded.cfg.max_position_embeddings
    blocks, reserved = kv_block_budget(settings, loaded, max_model_len)
    spec = EngineSpec(
        max_model_len=max_model_len,
        num_kv_blocks=blocks,
        block_size=settings.kv_block_size,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        ping_pong=settings.ping_pong,
        enable_prefix_caching=settings.enable_prefix_caching,
        cuda_graphs=settings.cuda_graphs,
        cuda_graph_memory_mb=settings.cuda_graph_memory_mb,
        batch_invariant=settings.batch_invariant,
        grammar=settings.grammar,
        async_scheduling=settings.async_scheduling,
        step_cost_ratio=settings.step_cost_ratio,
    )
    engine = LLMEngine(loaded, spec)
    graphs = engine.runner.graphs
    if graphs is not None:
        log.info("CUDA graphs took %.2f GiB (the KV budget set aside %.2f GiB for them)",
                 graphs.memory_bytes / GIB, reserved / GIB)
    return engine, loaded
