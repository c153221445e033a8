"""Automatic prefix caching: the block hash chain, sharing and LRU reuse in the block manager, and
the engine giving the same tokens with and without it (greedy and seeded sampling, chunked prefill,
preemption, eviction pressure) on the context-sum fake model and on the tiny-moge preset."""

from __future__ import annotations

import pytest

from actors.engine.block_manager import BlockManager, block_hash
from actors.engine.output.detokenizer import IncrementalDetokenizer
from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.sampling_params import SamplingParams
from actors.engine.sequence import Sequence
from actors.weights.tokenizer import ByteTokenizer
from tests.unit.test_engine import fake_engine, fake_reference, run_all, tokens_of


def make_seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, list(prompt), len(prompt), SamplingParams(), len(prompt) + 16, 0,
                    IncrementalDetokenizer(ByteTokenizer(), prompt, []))


def computed(bm: BlockManager, seq: Sequence, n: int | None = None) -> Sequence:
    """Admit `seq` over its cached prefix and pretend a step computed its first n tokens (all)."""
    hit = bm.cached_prefix(seq)
    n = seq.num_tokens if n is None else n
    bm.admit(seq, hit, n - len(hit) * bm.block_size)
    seq.num_computed_tokens = n
    bm.commit(seq)
    return seq


# ---- the hash chain ------------------------------------------------------------------------------


def test_block_hash_names_the_whole_prefix():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4]) and len(a) == 16
    assert a != block_hash(None, [1, 2, 4, 3])  # order matters
    assert a != block_hash(None, [1, 2, 3, 5])
    b = block_hash(a, [5, 6, 7, 8])
    assert b != block_hash(None, [5, 6, 7, 8])  # same tokens after a different prefix
    assert b != block_hash(block_hash(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hash(None, [256]) != block_hash(None, [1, 0])  # ids are not packed as bytes


def test_sequences_share_hashes_up_to_the_first_differing_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    x = computed(bm, make_seq("x", list(range(12))))
    y = make_seq("y", list(range(8)) + [99, 9, 10, 11, 12])
    assert x.block_hashes[:2] == bm._hashes(y, 2)
    assert x.block_hashes[2] != bm._hashes(y, 3)[2]


# ---- the block manager ---------------------------------------------------------------------------


def test_a_new_sequence_shares_the_cached_prefix_and_computes_the_rest():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(bm, make_seq("a", list(range(10))))  # blocks 0..7 full, 8..9 partial
    b = make_seq("b", list(range(10)) + [50, 51])
    hit = bm.cached_prefix(b)
    assert hit == a.block_table[:2]  # the partial third block is not cached
    assert bm.admission_cost(b, hit, 4) == 1  # tokens 8..11: one new block; the hit blocks are held
    bm.admit(b, hit, 4)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8 and b.block_table[:2] == hit
    assert [bm.ref_count(x) for x in hit] == [2, 2] and bm.ref_count(b.block_table[2]) == 1
    assert bm.num_free_blocks == 16 - 4 and (bm.queried_tokens, bm.hit_tokens) == (22, 8)
    bm.free(a)
    assert [bm.ref_count(x) for x in hit] == [1, 1] and bm.num_free_blocks == 16 - 3
    bm.free(b)
    assert all(bm.ref_count(x) == 0 for x in range(16)) and bm.num_free_blocks == 16 and bm.usage == 0


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    computed(bm, make_seq("a", list(range(12))))
    same = make_seq("b", list(range(12)))  # three full cached blocks, but one token must run
    assert len(bm.cached_prefix(same)) == 2
    assert len(bm.cached_prefix(make_seq("c", list(range(13))))) == 3
    assert bm.cached_prefix(make_seq("d", [0, 1, 2, 3])) == []


def test_released_cached_blocks_count_as_free_and_are_reused_lru_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = computed(bm, make_seq("a", [1, 2, 3, 4, 5]))  # 3 blocks, 2 full and cached
    b = computed(bm, make_seq("b", [7, 8, 9]))  # 2 blocks, 1 full and cached
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 3
    # two never-cached blocks go first (a's and b's partial blocks), then a's tail, a's head, b's
    c = make_seq("c", list(range(100, 112)))
    bm.allocate(c, 12)
    assert set(c.block_table[:3]) >= {a_blocks[2], b_blocks[1]}
    assert c.block_table[3:] == [a_blocks[1], a_blocks[0], b_blocks[0]]
    assert bm.num_cached_blocks == 0 and bm.evictions == 3
    bm.free(c)
    assert bm.cached_prefix(make_seq("a2", [1, 2, 3, 4, 5])) == []  # reclaimed blocks forget their hash


def test_a_hit_on_a_released_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed(bm, make_seq("a", [1, 2, 3, 4, 5]))
    bm.free(a)
    b = make_seq("b", [1, 2, 3, 4, 6, 7])
    hit = bm.cached_prefix(b)
    assert len(hit) == 2 and bm.admission_cost(b, hit, 2) == 3  # 1 new + 2 taken back from the free pool
    bm.admit(b, hit, 2)
    assert bm.num_free_blocks == 1
    filler = make_seq("f", [0, 0])
    bm.allocate(filler, 2)  # the last free block; the shared ones are not reclaimed under b
    assert b.block_table[:2] == hit and bm.num_free_blocks == 0


def test_a_prefix_computed_twice_keeps_the_first_copy_and_the_other_is_plain_free():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq("a", [1, 2, 3]), make_seq("b", [1, 2, 3])
    for s in (a, b):  # admitted in the same step: neither finds the other's blocks
        bm.admit(s, bm.cached_prefix(s), 3)
    for s in (a, b):
        s.num_computed_tokens = 3
        bm.commit(s)
    assert bm.num_cached_blocks == 1 and bm.cached_prefix(make_seq("c", [1, 2, 3])) == a.block_table[:1]
    bm.free(b)
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 1


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = computed(bm, make_seq("a", [1, 2, 3, 4, 5]))
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(make_seq("b", [1, 2, 3, 4, 5])) == []
    bm.free(a)
    assert bm.num_free_blocks == 8


# ---- the engine: same tokens with and without ----------------------------------------------------

SYSTEM = list(range(60, 83))  # 23 tokens: 5 full blocks of 4 shared by most prompts
SHARED = [SYSTEM + [1, 2, 3], SYSTEM + [1, 2, 3], SYSTEM + [9], SYSTEM[:8], SYSTEM + [1, 2, 3, 4, 5, 6, 7, 8, 9],
          [5, 5, 5], SYSTEM[:20]]


def shared_arrivals(params_of) -> dict[int, list]:
    """Arrivals spread over steps so that later requests find earlier ones' blocks (some still
    running, some finished), a few arriving together (no hit on each other)."""
    steps = [0, 3, 3, 6, 9, 9, 14]
    out: dict[int, list] = {}
    for i, (step, prompt) in enumerate(zip(steps, SHARED)):
        out.setdefault(step, []).append((f"r{i}", prompt, params_of(i)))
    return out


def assert_all_released(engine: LLMEngine) -> None:
    bm = engine.blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert bm.num_free_blocks == bm.num_blocks and engine.stats().kv_usage == 0


@pytest.mark.parametrize(
    "case, kv_blocks, batched_tokens",
    [("roomy", 64, 64), ("chunked", 64, 8), ("preempting", 14, 16), ("evicting", 12, 32)],
)
def test_fake_model_tokens_are_the_same_with_and_without_prefix_caching(case, kv_blocks, batched_tokens):
    def params_of(i):  # greedy and seeded sampling, mixed
        return SamplingParams(temperature=0, max_tokens=12) if i % 2 else SamplingParams(
            temperature=1.0, seed=100 + i, max_tokens=12)

    runs = {}
    for caching in (False, True):
        engine = fake_engine(num_kv_blocks=kv_blocks, block_size=4, max_num_batched_tokens=batched_tokens)
        engine.blocks.enable_prefix_caching = caching
        outs = run_all(engine, shared_arrivals(params_of))
        runs[caching] = ({rid: tokens_of(o) for rid, o in outs.items()}, engine.stats())
        assert_all_released(engine)
    (plain, plain_stats), (cached, stats) = runs[False], runs[True]
    assert cached == plain
    for i, p in enumerate(SHARED):
        if i % 2:
            assert plain[f"r{i}"] == fake_reference(p, 12)
    assert stats.prefix_cache_hit_tokens > 0 and plain_stats.prefix_cache_hit_tokens == 0
    if case == "preempting":
        assert stats.preemptions > 0
    if case == "evicting":  # released cached blocks had to be reclaimed for new ones
        assert engine.blocks.evictions > 0


def test_cached_tokens_reported_per_request():
    engine = fake_engine(num_kv_blocks=64, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    engine.add_request("first", list(range(10)), greedy)
    first = run_all(engine)["first"]
    assert {o.cached_tokens for o in first} == {0}
    completion = tokens_of(first)
    cases = {
        "same": (list(range(10)), 8),  # blocks 0-7; 8-9 were never a full block
        "exact-blocks": (list(range(8)), 4),  # the last token is computed again
        "longer": (list(range(10)) + completion, 12),  # the first request's generated tokens were cached too
        "other": (list(range(1, 10)), 0),
    }
    for rid, (prompt, want) in cases.items():
        engine.add_request(rid, prompt, greedy)
        outs = run_all(engine)[rid]  # one at a time: each can only hit what finished before
        assert {o.cached_tokens for o in outs} == {want}, rid
    engine.add_request("again", list(range(10)), greedy)
    outs = run_all(engine)["again"]
    assert all(o.cached_tokens == 8 for o in outs) and tokens_of(outs) == completion
    assert_all_released(engine)


def test_requests_admitted_together_each_report_their_own_hit():
    engine = fake_engine(num_kv_blocks=64, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=3)
    engine.add_request("a", list(range(12)), params)
    run_all(engine)
    seen = {}
    for rid, prompt in {"b": list(range(12)) + [1], "c": list(range(8)) + [7]}.items():
        engine.add_request(rid, prompt, params)
    for o in (o for _ in range(20) for o in engine.step()):
        seen.setdefault(o.request_id, set()).add(o.cached_tokens)
    assert seen == {"b": {12}, "c": {8}}
    stats = engine.stats()
    assert (stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (12 + 13 + 9, 20)


def test_shared_blocks_are_referenced_by_each_holder_and_abort_releases_only_its_own():
    engine = fake_engine(num_kv_blocks=32, block_size=4)
    engine.add_request("a", list(range(9)), SamplingParams(temperature=0, max_tokens=1))
    run_all(engine)
    for rid in ("b", "c"):
        engine.add_request(rid, list(range(9)) + [3], SamplingParams(max_tokens=20))
    engine.step()
    b, c = engine._seqs["b"], engine._seqs["c"]
    shared = b.block_table[:2]
    assert c.block_table[:2] == shared and [engine.blocks.ref_count(x) for x in shared] == [2, 2]
    assert engine.blocks.ref_count(b.block_table[2]) == 1 and b.block_table[2] != c.block_table[2]
    engine.abort_request("b")
    assert [engine.blocks.ref_count(x) for x in shared] == [1, 1]
    engine.step()  # c goes on reading the shared blocks
    engine.abort_request("c")
    assert_all_released(engine)


def test_the_config_switch_reaches_the_engine():
    from cluster.replica.assemble import engine_settings
    from tests.unit.test_engine import tiny_config

    assert engine_settings(tiny_config()).enable_prefix_caching is True
    assert engine_settings(tiny_config(enable_prefix_caching=False)).enable_prefix_caching is False


# ---- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    import torch

    from actors.weights.loader import load_model

    torch.manual_seed(0)
    return load_model("preset:tiny-moge", "float32", "cpu")


def test_tiny_moge_tokens_are_the_same_with_and_without_prefix_caching(tiny):
    system = tiny.tokenizer.encode("You are a helpful assistant who answers in one line. ")
    prompts = [system + tiny.tokenizer.encode(q) for q in ("What is MoGE?", "What is MoE?", "Why?")]
    prompts += [prompts[0], system[:9]]

    def params_of(i):
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True) if i % 2 else SamplingParams(
            temperature=0.9, top_p=0.9, seed=7 + i, max_tokens=8, ignore_eos=True)

    runs = {}
    for caching in (False, True):
        spec = EngineSpec(max_model_len=128, num_kv_blocks=24, block_size=4, max_num_seqs=8,
                          max_num_batched_tokens=24, enable_prefix_caching=caching)
        engine = LLMEngine(tiny, spec)
        arrivals = {2 * i: [(f"r{i}", p, params_of(i))] for i, p in enumerate(prompts)}
        runs[caching] = {rid: tokens_of(o) for rid, o in run_all(engine, arrivals).items()}
        assert_all_released(engine)
    assert runs[True] == runs[False]
    assert engine.stats().prefix_cache_hit_tokens > 0
