"""AsyncEngine on the tiny-moge preset: streaming, concurrency, disconnects, step boundaries."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from actors.engine.async_engine import AsyncEngine, EngineStopped
from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams

WAIT_S = 60  # upper bound for anything that should take well under a second


@pytest.fixture(scope="module")
def tiny():
    from actors.weights.loader import load_model

    return load_model("preset:tiny-moge", "float32", "cpu")


@pytest.fixture
def engine(tiny):
    spec = EngineSpec(max_model_len=256, num_kv_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    eng = AsyncEngine(LLMEngine(tiny, spec))
    yield eng
    eng.shutdown()


def boundary(eng: AsyncEngine, fn=lambda: None):
    """Run fn on the step thread at the next boundary (after queued adds / aborts) and return it."""
    return eng.run_at_step_boundary(fn).result(timeout=WAIT_S)


async def collect(eng: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    return [out async for out in eng.generate(rid, prompt, params)]


def test_concurrent_streams_each_equal_the_reference(engine, tiny):
    from actors.model.reference import greedy_reference

    prompts = [tiny.tokenizer.encode(t) for t in ["alpha", "a much longer prompt than the others", "z"]]
    params = SamplingParams(temperature=0, max_tokens=10)

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts))), WAIT_S)

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results):
        assert [t for o in outs for t in o.new_token_ids] == greedy_reference(tiny, prompt, 10)
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].finish_reason in ("stop", "length") and outs[-1].prompt_tokens == len(prompt)
    assert boundary(engine, engine.engine.stats).kv_usage == 0


def test_a_consumer_that_stops_listening_aborts_and_frees_its_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = engine.generate("gone", [1, 2, 3, 4, 5], params)
        first = await asyncio.wait_for(anext(stream), WAIT_S)
        assert not first.finished
        await stream.aclose()  # what a closed HTTP response does to its body iterator

    asyncio.run(main())
    stats = boundary(engine, engine.engine.stats)  # the abort was drained before this ran
    assert stats.kv_usage == 0 and stats.running == 0 and stats.waiting == 0


def test_a_cancelled_consumer_task_aborts_its_request(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        got_one = asyncio.Event()

        async def consume():
            async for _ in engine.generate("cancelled", [9, 8, 7], params):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    stats = boundary(engine, engine.engine.stats)
    assert stats.kv_usage == 0 and stats.running == 0


def test_rejected_requests_raise_before_streaming(engine):
    with pytest.raises(RequestRejected, match="context length"):
        engine.generate("long", [1] * 200, SamplingParams(max_tokens=100))

    async def main():
        stream = engine.generate("dup", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
        await anext(stream)
        with pytest.raises(RequestRejected, match="already"):
            engine.generate("dup", [1, 2], SamplingParams())
        await stream.aclose()

    asyncio.run(main())


def test_step_boundary_hooks_run_between_steps_never_inside(engine):
    inner = engine.engine.runner.model
    state = {"in_step": False, "steps": 0, "hook_calls": 0, "overlaps": 0}

    def model(batch, kv):
        state["in_step"] = True
        try:
            return inner(batch, kv)
        finally:
            state["steps"] += 1
            state["in_step"] = False

    def hook():
        state["hook_calls"] += 1
        state["overlaps"] += state["in_step"]

    model.experts = inner.experts  # the runner still calls the experts' step hooks
    engine.engine.runner.model = model
    engine.on_step_boundary(hook)

    async def main():
        await asyncio.wait_for(collect(engine, "h", [3, 4, 5], SamplingParams(temperature=0, max_tokens=8)), WAIT_S)

    asyncio.run(main())
    boundary(engine)
    assert state["steps"] >= 8 and state["hook_calls"] >= state["steps"] and state["overlaps"] == 0


def test_stats_count_queued_requests_as_waiting(tiny):
    spec = EngineSpec(max_model_len=256, num_kv_blocks=40, block_size=8, max_num_seqs=1, max_num_batched_tokens=64)
    eng = AsyncEngine(LLMEngine(tiny, spec))
    entered, release = threading.Event(), threading.Event()

    def pause():  # holds the step thread at a boundary so the test sees a frozen engine
        entered.set()
        release.wait(WAIT_S)

    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            a = eng.generate("a", [1, 2], params)
            await asyncio.wait_for(anext(a), WAIT_S)
            eng.run_at_step_boundary(pause)
            assert entered.wait(WAIT_S)
            b = eng.generate("b", [3, 4], params)
            pending = asyncio.create_task(anext(b))
            await asyncio.sleep(0)  # one loop turn: the task registers b (it is now in the inbox)
            stats = eng.stats()
            assert (stats.running, stats.waiting) == (1, 1)
            release.set()
            stats = boundary(eng, eng.engine.stats)  # b is in the engine now, behind a (one slot)
            assert (stats.running, stats.waiting) == (1, 1) and stats.kv_usage > 0
            pending.cancel()
            await a.aclose()

        asyncio.run(main())
    finally:
        release.set()
        eng.shutdown()
    assert eng.engine.stats().kv_usage == 0


def test_shutdown_ends_open_streams_and_refuses_new_ones(tiny):
    spec = EngineSpec(max_model_len=256, num_kv_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    eng = AsyncEngine(LLMEngine(tiny, spec))

    async def main():
        stream = eng.generate("open", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        await asyncio.wait_for(anext(stream), WAIT_S)
        assert eng.is_alive()
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        assert not eng.is_alive()  # /health and Serve's probe now fail
        rest = [o async for o in stream]
        assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"

    asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert eng.engine.stats().kv_usage == 0
    with pytest.raises(EngineStopped):
        eng.generate("late", [1], SamplingParams())


def test_a_failing_step_fails_its_requests_instead_of_hanging(engine):
    def broken(batch, kv):
        raise RuntimeError("expert worker unreachable")

    broken.experts = engine.engine.runner.model.experts  # the runner still calls the experts' step hooks
    engine.engine.runner.model = broken

    async def main():
        with pytest.raises(RuntimeError, match="unreachable"):
            await asyncio.wait_for(collect(engine, "x", [1, 2], SamplingParams(max_tokens=4)), WAIT_S)

    asyncio.run(main())
    assert boundary(engine, engine.engine.stats).kv_usage == 0


def _run_sync(tiny, rid: str, prompt: list[int], params: SamplingParams):
    """The same request on a plain engine, whose step thread makes the text (make_text)."""
    spec = EngineSpec(max_model_len=256, num_kv_blocks=40, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    eng = LLMEngine(tiny, spec)
    eng.add_request(rid, prompt, params)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


def test_stop_strings_end_a_stream_as_on_the_step_thread_and_free_its_blocks(engine, tiny):
    prompt = tiny.tokenizer.encode("stop strings")
    free = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    full = "".join(o.new_text for o in _run_sync(tiny, "ref", prompt, free))
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip())
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True, stop=[stop])
    want = _run_sync(tiny, "want", prompt, params)
    decoded_on = set()
    decode = tiny.tokenizer.decode

    def spy(*args, **kwargs):
        decoded_on.add(threading.current_thread().name)
        return decode(*args, **kwargs)

    tiny.tokenizer.decode = spy
    try:
        got = asyncio.run(asyncio.wait_for(collect(engine, "s", prompt, params), WAIT_S))
    finally:
        tiny.tokenizer.decode = decode
    assert "".join(o.new_text for o in got) == "".join(o.new_text for o in want) == full[:full.find(stop)]
    assert [t for o in got for t in o.new_token_ids] == [t for o in want for t in o.new_token_ids]
    assert (got[-1].finish_reason, got[-1].completion_tokens) == ("stop", want[-1].completion_tokens)
    assert decoded_on and "engine-step" not in decoded_on  # the text was made on the consumer's side
    stats = boundary(engine, engine.engine.stats)  # the engine ran on past the stop: it was aborted
    assert stats.kv_usage == 0 and stats.running == 0


def test_a_consumer_that_falls_behind_gets_what_waits_as_one_output(engine, tiny):
    from actors.model.reference import greedy_reference

    prompt = [5, 6, 7]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def made(n: int) -> None:  # until the engine has made n tokens (bounded)
        deadline = time.monotonic() + WAIT_S
        while boundary(engine, engine.engine.stats).tokens_generated < n and time.monotonic() < deadline:
            time.sleep(0.01)

    async def main():
        stream = engine.generate("slow", prompt, params)
        first = await asyncio.wait_for(anext(stream), WAIT_S)
        before = boundary(engine, engine.engine.stats).tokens_generated
        await asyncio.to_thread(made, before + 6)  # the loop queues outputs meanwhile; nobody reads them
        second = await asyncio.wait_for(anext(stream), WAIT_S)
        rest = [o async for o in stream]
        return [first, second, *rest]

    outs = asyncio.run(main())
    assert len(outs[1].new_token_ids) >= 6
    assert [t for o in outs for t in o.new_token_ids] == greedy_reference(tiny, prompt, 24, stop_at_eos=False)
    assert outs[-1].finished and outs[-1].completion_tokens == 24
