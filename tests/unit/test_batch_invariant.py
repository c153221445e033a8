"""`engine.batch_invariant` on CPU: the ops give every row the same bits whatever the other rows, and
so the engine gives a request bit-identical logits alone, among random other requests, with its
prefix from the cache, prefilled in several chunks, preempted and recomputed, and through any
placement of its expert groups — for tiny-moge and a tiny Qwen3-MoE checkpoint."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.sampling_params import SamplingParams
from actors.model import kernels
from actors.model.kernels import invariant
from tests.checkpoints import write_qwen3_moe


@pytest.fixture(autouse=True)
def default_mode_after():
    yield
    kernels.set_batch_invariant(False)  # the mode is the process's: leave it as other tests expect


# ---- ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, n", [(128, 512), (64, 48), (1024, 96)])
def test_linear_rows_are_the_same_in_any_batch(dtype, k, n):
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    x = torch.randn(300, k, generator=g).to(dtype)
    full = invariant.linear(x, w, b)
    torch.testing.assert_close(full.float(), F.linear(x.float(), w.float(), b.float()),
                               **({} if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)))
    perm = torch.randperm(300, generator=g)
    assert torch.equal(invariant.linear(x[perm], w, b), full[perm])
    for lo, hi in ((0, 1), (7, 8), (3, 12), (5, 40), (17, 300)):
        assert torch.equal(invariant.linear(x[lo:hi], w, b), full[lo:hi]), (lo, hi)


def test_silu_of_a_row_does_not_depend_on_where_the_tensor_ends():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3
    whole = invariant.silu(x)
    assert all(torch.equal(invariant.silu(x[o:o + n].clone()), whole[o:o + n]) for n in range(1, 40) for o in (0, 3, 9))
    torch.testing.assert_close(whole, F.silu(x))


# ---- the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny-moge", "qwen3-moe"])
def model(request, tmp_path_factory):
    from actors.weights.loader import load_model

    torch.manual_seed(0)
    if request.param == "tiny-moge":
        return load_model("preset:tiny-moge", "float32", "cpu")
    return load_model(write_qwen3_moe(tmp_path_factory.mktemp("qwen3")), "float32", "cpu")


MAX_NEW = 4
BLOCK = 8


def spec(**kw) -> EngineSpec:
    base = dict(max_model_len=192, num_kv_blocks=160, block_size=BLOCK, max_num_seqs=16,
                max_num_batched_tokens=512, batch_invariant=True)
    return EngineSpec(**{**base, **kw})


class Recorder:
    """Every logits row the engine computes, by (request id, tokens computed after the step)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.rows: dict[str, dict[int, torch.Tensor]] = {}
        execute = engine.runner.execute

        def recording(scheduled, prompt_rows=None):
            logits, extra = execute(scheduled, prompt_rows)
            for i, (seq, n) in enumerate(zip(scheduled.seqs, scheduled.num_new_tokens)):
                if seq.num_computed_tokens + n == seq.num_tokens:  # a row that samples
                    self.rows.setdefault(seq.request_id, {})[seq.num_computed_tokens + n] = logits[i].clone()
            return logits, extra

        engine.runner.execute = recording


def run(model, arrivals: dict[int, list[tuple[str, list[int]]]], max_steps=4000, **kw):
    """Requests added at their step; -> (recorded rows, engine)."""
    engine = LLMEngine(model, spec(**kw))
    rec = Recorder(engine)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for step in range(max_steps):
        for rid, prompt in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        if not engine.has_unfinished() and step > max(arrivals):
            break
        engine.step()
    assert not engine.has_unfinished()
    return rec.rows, engine


def prompt_of(model, seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, min(250, model.cfg.vocab_size)) for _ in range(n)]


def assert_same_rows(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    diff = [p for p in want if not torch.equal(got[p], want[p])]
    assert not diff, f"{what}: logits differ at positions {diff}"


@pytest.fixture(scope="module")
def target(model):
    """The request under test (37 tokens: four KV blocks and a part) and its logits alone."""
    prompt = prompt_of(model, 7, 37)
    rows, _ = run(model, {0: [("t", prompt)]})
    return prompt, rows["t"]


@pytest.mark.parametrize("others", [2, 9])
def test_logits_are_bit_identical_alone_and_among_random_requests(model, target, others):
    prompt, alone = target
    rng = random.Random(others)
    arrivals: dict[int, list] = {}
    for i in range(others):  # before, with and after it; prompts of every length up to 60
        arrivals.setdefault(rng.randrange(0, 8), []).append((f"o{i}", prompt_of(model, 100 + i, rng.randrange(1, 60))))
    arrivals.setdefault(rng.randrange(0, 4), []).append(("t", prompt))
    rows, _ = run(model, arrivals)
    assert_same_rows(rows["t"], alone, f"among {others} others")


@pytest.mark.parametrize("case", ["cached-prefix", "chunked", "preempted"])
def test_cache_chunks_and_recompute_change_no_bit(model, target, case):
    prompt, alone = target
    mates = [(f"m{i}", prompt_of(model, 200 + i, 20 + 7 * i)) for i in range(3)]
    if case == "cached-prefix":  # a request with the first 3 blocks of the prompt finishes first
        rows, engine = run(model, {0: [("warm", prompt[: 3 * BLOCK + 3])], 8: [("t", prompt)] + mates})
        assert engine.blocks.hit_tokens >= 3 * BLOCK
    elif case == "chunked":  # 16-token steps: the prompt in several chunks, beside other prefills
        rows, _ = run(model, {0: mates[:2], 1: [("t", prompt)], 3: mates[2:]}, max_num_batched_tokens=16)
    else:  # every prompt admitted into 16 blocks, then decoding needs more: the last one admitted
        # (the target) is preempted and later recomputed from its tokens, generated ones as prefill
        short = [(f"s{i}", prompt_of(model, 300 + i, n)) for i, n in enumerate((15, 23, 31))]
        rows, engine = run(model, {0: short + [("t", prompt)]}, num_kv_blocks=16, max_num_batched_tokens=128)
        assert engine.stats().preemptions > 0
    assert_same_rows(rows["t"], alone, case)


def test_greedy_tokens_match_the_default_mode(model, target):
    """The invariant mode is the same model: its greedy tokens are the default mode's."""
    prompt, alone = target
    rows, engine = run(model, {0: [("t", prompt)]}, batch_invariant=False)
    assert [int(alone[p].argmax()) for p in sorted(alone)] == [int(rows["t"][p].argmax()) for p in sorted(alone)]
    torch.testing.assert_close(torch.stack([alone[p] for p in sorted(alone)]),
                               torch.stack([rows["t"][p] for p in sorted(alone)]), atol=1e-4, rtol=1e-4)


# ---- placements: every path adds the groups' partials the same way ---------------------------------


def test_every_placement_gives_the_local_bits_for_any_batch():
    """The Dispatcher over the in-process carrier on 1..4 workers, with groups held twice (their
    tokens split between holders) and with groups in the replica's own process (the local holder),
    against LocalExperts, for one token alone and in batches."""
    from dataclasses import replace

    from actors.experts.placement import pack_groups
    from actors.model.local_experts import LocalExperts
    from actors.model.presets import get_preset
    from actors.weights.loader import random_expert_groups
    from tests.unit.test_remote_experts import make_workers, remote, routing

    kernels.set_batch_invariant(True)
    for cfg in (get_preset("tiny-moge"), replace(get_preset("tiny-moge"), family="mixtral", top_k=3,
                                                 router_scale=False, renormalize=True)):
        local = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0))
        x, ids, w = routing(cfg, 24, seed=3)
        alone = torch.cat([local.dispatch(1, x[i:i + 1], ids[i:i + 1], w[i:i + 1]).wait() for i in range(24)])
        assert torch.equal(local.dispatch(1, x, ids, w).wait(), alone)
        for d in (1, 2, 3, 4, 6):  # 6 workers: groups 0 and 1 on two holders each
            names = [f"w{i}" for i in range(d)]
            rx = remote(cfg, pack_groups(cfg.n_groups, names), make_workers(cfg, names))
            for lo, hi in ((0, 24), (5, 6), (9, 20)):
                assert torch.equal(rx.dispatch(1, x[lo:hi], ids[lo:hi], w[lo:hi]).wait(), alone[lo:hi]), (cfg.family, d, lo)
            rx.close()
    # groups 0, 1 held in the replica's own process (the "local" holder), 2, 3 on a worker
    from actors.experts.local_holder import LOCAL, LocalHolder
    from actors.experts.placement import Placement
    from actors.experts.carriers.base import WorkerRef
    from actors.experts.carriers.inprocess import InProcessCarrier
    from actors.experts.dispatch.dispatcher import Dispatcher

    cfg = get_preset("tiny-moge")
    local = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0))
    x, ids, w = routing(cfg, 24, seed=4)
    alone = torch.cat([local.dispatch(2, x[i:i + 1], ids[i:i + 1], w[i:i + 1]).wait() for i in range(24)])
    worker = make_workers(cfg, ["w0"])["w0"]
    worker.load_groups([2, 3])
    holder = LocalHolder(cfg, torch.device("cpu"), torch.float32, random_expert_groups(cfg, [0, 1], 0))
    rx = Dispatcher(cfg, InProcessCarrier(), Placement(0, ((LOCAL,), (LOCAL,), ("w0",), ("w0",))),
                       {"w0": WorkerRef("w0", local=worker)}, local=holder)
    assert torch.equal(rx.dispatch(2, x[3:17], ids[3:17], w[3:17]).wait(), alone[3:17])
    rx.close()
