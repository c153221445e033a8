"""Async scheduling (step N + 1 launched before step N's tokens reach the host, its decode rows
reading them on the device) gives exactly the tokens, finish reasons and token counts of the
synchronous engine: chunked prompts, shared prefixes, preemption, stop tokens that end sequences
while their next row is already launched (one dropped row each at most), seeded sampling, and
prompt-scoring requests that force synchronous steps. On CPU, where the same code runs without
overlap; on CUDA tests/gpu/test_cuda_graphs.py checks it through the graphs."""

from __future__ import annotations

import pytest

from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.sampling_params import SamplingParams
from actors.weights.loader import load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model("preset:tiny-moge", "float32", "cpu")


def engine_for(loaded, async_scheduling: bool, num_kv_blocks: int = 256, **kw) -> LLMEngine:
    spec = EngineSpec(max_model_len=96, num_kv_blocks=num_kv_blocks, block_size=4, max_num_seqs=6,
                      max_num_batched_tokens=24, async_scheduling=async_scheduling, **kw)
    return LLMEngine(loaded, spec)


def run(engine: LLMEngine, requests) -> tuple[dict, dict, int]:
    """-> ({id: tokens}, {id: (finish reason, completion tokens)}, rows computed per finished request)."""
    rows = {}
    execute = engine.runner.execute

    def counting(scheduled, prompt_rows=None):
        for s, n in zip(scheduled.seqs, scheduled.num_new_tokens):
            rows[s.request_id] = rows.get(s.request_id, 0) + n
        return execute(scheduled, prompt_rows)

    engine.runner.execute = counting
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    tokens, ends = {rid: [] for rid, _, _ in requests}, {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                ends[out.request_id] = (out.finish_reason, out.completion_tokens)
    assert not engine.has_unfinished()
    return tokens, ends, rows


def prompts():
    shared = [5, 6, 7, 8, 9, 10, 11, 12]  # two full blocks shared by some prompts: prefix-cache hits
    return [[(7 * i + j) % 200 + 3 for j in range(n)] if i % 3 else shared + [i] * n
            for i, n in enumerate([3, 30, 9, 17, 1, 26])]


def greedy_requests(stop_ids=None):
    out = []
    for i, p in enumerate(prompts()):
        stop = [] if stop_ids is None else stop_ids[i]
        out.append((f"r{i}", p, SamplingParams(temperature=0, max_tokens=6 + 2 * i, ignore_eos=True,
                                               stop_token_ids=stop)))
    return out


def test_async_greedy_equals_sync_with_chunks_prefixes_and_early_stops(loaded):
    want, _, _ = run(engine_for(loaded, False), greedy_requests())
    # a stop token per request taken from the middle of its own output: sequences end early, while
    # their next decode row is already in flight
    stops = [[want[f"r{i}"][len(want[f"r{i}"]) // 2]] for i in range(len(want))]
    sync = run(engine_for(loaded, False), greedy_requests(stops))
    asyn = run(engine_for(loaded, True), greedy_requests(stops))
    assert asyn[0] == sync[0] and asyn[1] == sync[1]
    assert any(reason == "stop" for reason, _ in sync[1].values())
    for rid, n in asyn[2].items():  # at most one row computed past a sequence's end
        assert sync[2][rid] <= n <= sync[2][rid] + 1, rid


def test_async_equals_sync_under_preemption(loaded):
    """A cache of 20 blocks (4 tokens each) for 6 requests of up to 42 tokens: sequences are
    preempted and recomputed, some while their token is in flight."""
    sync = run(engine_for(loaded, False, num_kv_blocks=20), greedy_requests())
    engine = engine_for(loaded, True, num_kv_blocks=20)
    asyn = run(engine, greedy_requests())
    assert engine.stats().preemptions > 0
    assert asyn[0] == sync[0] and asyn[1] == sync[1]


def test_async_seeded_sampling_and_logprobs_equal_sync(loaded):
    def requests():
        return [(f"s{i}", p, SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=6, logprobs=2,
                                            ignore_eos=True)) for i, p in enumerate(prompts())]

    def run_lp(engine):
        for rid, p, params in requests():
            engine.add_request(rid, p, params)
        lps = {}
        for _ in range(500):
            if not engine.has_unfinished():
                break
            for out in engine.step():
                lps.setdefault(out.request_id, []).extend((t.token_id, t.logprob) for t in out.logprobs or [])
        return lps

    # same tokens; log-probs within float32 rounding (a dropped row changes a batch's shape)
    asyn, sync = run_lp(engine_for(loaded, True)), run_lp(engine_for(loaded, False))
    assert {r: [t for t, _ in v] for r, v in asyn.items()} == {r: [t for t, _ in v] for r, v in sync.items()}
    for rid in sync:
        assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(asyn[rid], sync[rid]))


def test_a_prompt_scoring_request_runs_its_steps_synchronously_with_the_same_results(loaded):
    def requests():
        reqs = greedy_requests()[:3]
        reqs.append(("score", prompts()[5], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)))
        return reqs

    engine = engine_for(loaded, True)
    assert run(engine, requests())[:2] == run(engine_for(loaded, False), requests())[:2]
    assert engine._inflight is None and not engine._sync_requests
