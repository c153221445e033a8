"""The CUDA-graph step runner's host side on CPU: static buffers, bucket padding (one-token padding
sequences up to max_num_seqs, one padding sequence past it) and the pad block give the same greedy
tokens as the plain eager engine, for decode steps and mixed prefill + decode steps alike (on CUDA
the same buffers are replayed from captured graphs: tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import pytest

from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.graphs.step_graphs import StepGraphs, bucket_sizes, token_buckets
from actors.engine.sampling_params import SamplingParams
from actors.model.kv_cache import PagedKVCache
from actors.weights.loader import load_model


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert bucket_sizes(44)[-2:] == [40, 44]


def test_token_buckets_cover_every_step_size_with_bounded_padding():
    sizes = token_buckets(256, 8192)
    assert sizes[:4] == [1, 2, 4, 8] and 256 in sizes and sizes[-1] == 8192
    assert {320, 1024, 1280, 4096, 5120} <= set(sizes)
    for t in range(1, 8193):
        bucket = next(s for s in sizes if s >= t)
        assert bucket - t <= max(7, t // 4), t
    assert token_buckets(8, 100) == [1, 2, 4, 8, 16, 64, 100]  # 16: the GEMV cut-over
    assert token_buckets(32, 16) == [1, 2, 4, 8, 16]


def test_a_padded_step_takes_the_kernel_path_of_its_real_token_count():
    """Every cut-over of the kernel table (GEMV vs grouped, FP8 activations kept vs quantized)
    puts a step's real token count and the graph bucket it is padded to on the same side, whatever
    the engine's sizes and a tuned cut-over (CUDA graphs must give the eager step's tokens)."""
    import os

    from actors.model.kernels.gemm import configs

    for over in ("64", "100", "127", "300"):
        os.environ["MOGE_GEMM_W8A8_OVER_TOKENS"] = os.environ["MOGE_GEMM_DENSE_W8A8_OVER_TOKENS"] = over
        try:
            for max_seqs, max_tokens in ((4, 256), (12, 2048), (64, 2048), (70, 512), (256, 8192)):
                sizes = token_buckets(max_seqs, max_tokens)
                for t in range(1, max_tokens + 1):
                    b = next(s for s in sizes if s >= t)
                    for key in ("w8a8_over_tokens", "dense_w8a8_over_tokens"):
                        assert configs.w8a8(t, key) == configs.w8a8(b, key), (over, max_seqs, t, b)
                    for limit in configs.cutover_tokens():
                        assert (t <= limit) == (b <= limit), (max_seqs, t, b, limit)
        finally:
            del os.environ["MOGE_GEMM_W8A8_OVER_TOKENS"], os.environ["MOGE_GEMM_DENSE_W8A8_OVER_TOKENS"]


def with_static_steps(engine: LLMEngine, max_seqs: int, max_tokens: int) -> StepGraphs:
    """Swap in a pad-block KV cache and the graph runner's static buffers, uncaptured (eager)."""
    runner = engine.runner
    runner.kv = engine.kv = PagedKVCache.for_model(
        runner.cfg, engine.spec.num_kv_blocks, engine.spec.block_size, runner.dtype, runner.device, pad_block=True
    )
    blocks = -(-engine.spec.max_model_len // engine.spec.block_size)
    runner.graphs = StepGraphs(runner.model, runner.kv, max_seqs, max_tokens, blocks, 0, runner.sampled)
    runner.graphs.use_buckets(runner.graphs.sizes)
    return runner.graphs


def generate(engine: LLMEngine, prompts, lengths) -> dict[str, list[int]]:
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return engine.run_to_completion(max_steps=500)


@pytest.mark.parametrize("block_size", [4, 16])
def test_static_buffers_and_padding_give_eager_tokens(block_size):
    loaded = load_model("preset:tiny-moge", "float32", "cpu")
    prompts = [[(3 * i + j) % 250 for j in range(n)] for i, n in enumerate([1, 9, 23, 4, 17])]
    lengths = [12, 3, 9, 6, 2]  # decode batches of 4, 3, 2, 1: padded buckets and exact ones
    # max_num_batched_tokens 20: the 23- and 17-token prompts are chunked next to decodes
    spec = EngineSpec(max_model_len=64, num_kv_blocks=128, block_size=block_size, max_num_seqs=8,
                      max_num_batched_tokens=20)
    want = generate(LLMEngine(loaded, spec), prompts, lengths)

    engine = LLMEngine(loaded, spec)
    graphs = with_static_steps(engine, max_seqs=8, max_tokens=20)
    assert graphs.sizes == [1, 2, 4, 8, 16, 20]  # 16: the GEMV cut-over
    calls = []
    run = graphs.run
    graphs.run = lambda inputs: calls.append((inputs.num_tokens, inputs.num_seqs)) or run(inputs)
    assert generate(engine, prompts, lengths) == want
    assert {t for t, b in calls if t == b} >= {1, 2, 3, 4}  # decode steps went through the buffers
    assert any(t > b for t, b in calls)  # so did steps with prompt chunks ...
    assert any(t > 8 for t, _ in calls)  # ... also past max_num_seqs (one padding sequence)
    pad = engine.kv.pad_block
    assert pad == 128 and engine.kv.k[0].shape[0] == 129
    assert engine.kv.k[0][pad].abs().sum() > 0  # padding rows wrote there, and nowhere else


def test_the_step_cost_profile_stays_within_max_model_len_and_the_cache():
    """Each profiled step is max_num_seqs decodes plus one prompt chunk, so a bucket whose chunk
    would exceed max_model_len (or the block table) is not profiled; the steps' blocks and slots
    are each sequence's own."""
    from actors.engine.graphs.step_cost import profile_inputs, profile_sizes

    assert profile_sizes([1, 8, 16, 40, 64, 100, 1024], 16, 60) == [16, 40, 64]
    gen = __import__("torch").Generator().manual_seed(0)
    inputs = profile_inputs(3, 10, 7, 4, 512, gen)
    assert inputs.num_tokens == 10 and inputs.num_seqs == 4 and inputs.context_lens == [10, 10, 10, 7]
    assert inputs.positions == [9, 9, 9, *range(7)] and inputs.query_start == [0, 1, 2, 3, 10]
    assert len(set(inputs.slots)) == 10  # no shared KV slot: the tokens' hidden states stay apart
    blocks = [b for t in inputs.tables for b in t]
    assert len(set(blocks)) == len(blocks) == 3 * 3 + 2
