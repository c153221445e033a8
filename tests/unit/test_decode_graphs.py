"""The CUDA-graph decode runner's host side on CPU: static buffers, bucket padding and the pad block
give the same greedy tokens as the plain eager engine (on CUDA the same buffers are replayed from
captured graphs: tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.graphs.cuda_graphs import DecodeGraphs, bucket_sizes
from actors.engine.sampling_params import SamplingParams
from actors.model.kv_cache import PagedKVCache
from actors.weights.loader import load_model


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert bucket_sizes(44)[-2:] == [40, 44]


def with_static_decode(engine: LLMEngine, max_batch: int) -> DecodeGraphs:
    """Swap in a pad-block KV cache and the graph runner's static buffers, uncaptured (eager)."""
    runner = engine.runner
    cfg = runner.cfg
    runner.kv = engine.kv = PagedKVCache.for_model(
        cfg, engine.spec.num_kv_blocks, engine.spec.block_size, runner.dtype, runner.device, pad_block=True
    )
    blocks = -(-engine.spec.max_model_len // engine.spec.block_size)
    runner.graphs = DecodeGraphs(runner.model, runner.kv, max_batch, blocks, cuda_graph_memory_mb=0)
    runner.graphs.use_buckets(bucket_sizes(max_batch))
    return runner.graphs


def generate(engine: LLMEngine, prompts, lengths) -> dict[str, list[int]]:
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return engine.run_to_completion(max_steps=500)


@pytest.mark.parametrize("block_size", [4, 16])
def test_static_buffers_and_padding_give_eager_tokens(block_size):
    loaded = load_model("preset:tiny-moge", "float32", "cpu")
    prompts = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate([1, 9, 23, 4, 17])]
    lengths = [12, 3, 9, 6, 2]  # decode batches of 5, 4, 3, 2, 1: padded buckets and exact ones
    spec = EngineSpec(max_model_len=64, num_kv_blocks=128, block_size=block_size, max_num_seqs=8)
    want = generate(LLMEngine(loaded, spec), prompts, lengths)

    engine = LLMEngine(loaded, spec)
    graphs = with_static_decode(engine, max_batch=8)
    calls = []
    run = graphs.run
    graphs.run = lambda seqs: calls.append(len(seqs)) or run(seqs)
    assert generate(engine, prompts, lengths) == want
    assert set(calls) == {1, 2, 3, 4, 5}  # every decode step went through the static buffers
    pad = engine.kv.pad_block
    assert pad == 128 and engine.kv.k[0].shape[0] == 129
    assert engine.kv.k[0][pad].abs().sum() > 0  # padding rows wrote there, and nowhere else
