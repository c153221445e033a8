"""Per-request isolation inside the engine: a request whose sampling fails inside a step fails
alone (its batch mates keep the reference tokens), values that cannot become tensors are refused at
admission, and a step that fails once is retried before anyone is failed."""

from __future__ import annotations

import asyncio

import pytest

from actors.engine.async_engine import AsyncEngine
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams
from tests.unit.test_engine import PROMPTS, fake_engine, fake_reference, run_all, tokens_of

POISON_TOP_K = 42  # the sampler below raises for any batch containing the slot of the request "bad"


class PoisonedSampler:
    """Wraps the real sampler; raises, as an overflow inside torch would, for any batch holding the
    sampling slot of one request (found through the engine, as the slot table is per engine)."""

    def __init__(self, inner, engine) -> None:
        self.inner, self.engine = inner, engine

    def __call__(self, logits, slots, flags, allowed=None):
        bad = self.engine._seqs.get("bad")
        if bad is not None and bad.slot is not None and bad.slot in slots.tolist():
            raise RuntimeError("value cannot be converted to type int64 without overflow")
        return self.inner(logits, slots, flags, allowed)


def test_a_request_that_breaks_sampling_fails_alone_and_the_batch_keeps_its_tokens():
    engine = fake_engine()
    engine.sampler = PoisonedSampler(engine.sampler, engine)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"ok{i}", p, greedy)
    engine.add_request("bad", [1, 2, 3], SamplingParams(temperature=0.5, top_k=POISON_TOP_K, max_tokens=12))
    outs = run_all(engine)
    for i, p in enumerate(PROMPTS[:4]):
        assert tokens_of(outs[f"ok{i}"]) == fake_reference(p, 12)
        assert all(o.error is None for o in outs[f"ok{i}"])
    (bad,) = outs["bad"]
    assert bad.finished and bad.finish_reason == "abort" and isinstance(bad.error, RuntimeError)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.5, seed=1 << 64),
    SamplingParams(temperature=0.5, top_k=1 << 63),
    SamplingParams(temperature=float("inf")),
])
def test_values_that_cannot_become_tensors_are_refused_at_admission(params):
    engine = fake_engine()
    with pytest.raises(RequestRejected):
        engine.add_request("x", [1, 2, 3], params)
    assert not engine.has_unfinished()


class FailOnce:
    """A model run that raises once (a transient fault after scheduling), then runs normally."""

    def __init__(self, execute) -> None:
        self.execute, self.failures = execute, 0

    def __call__(self, *args, **kwargs):
        if self.failures == 0:
            self.failures += 1
            raise ConnectionError("transient")
        return self.execute(*args, **kwargs)


def test_a_step_that_fails_once_is_retried_and_nobody_fails():
    inner = fake_engine()
    inner.runner.execute = FailOnce(inner.runner.execute)
    eng = AsyncEngine(inner)
    try:

        async def main():
            gens = [eng.generate(f"r{i}", p, SamplingParams(temperature=0, max_tokens=6)) for i, p in enumerate(PROMPTS[:3])]

            async def collect(g):
                return [t async for o in g for t in o.new_token_ids]

            return await asyncio.wait_for(asyncio.gather(*(collect(g) for g in gens)), 60)

        results = asyncio.run(main())
        assert inner.runner.execute.failures == 1
        assert results == [fake_reference(p, 6) for p in PROMPTS[:3]]
    finally:
        eng.shutdown()
