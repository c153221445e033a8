"""LLMEngine: request lifecycle on a fast fake model that reads its whole context back from the
paged KV cache, then batching equality with the single-sequence reference on the tiny-moge preset."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from actors.engine.engine import EngineSpec, LLMEngine, RequestOutput
from actors.model.config import ModelConfig
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams
from actors.weights.tokenizer import ByteTokenizer

# ---- a fake model whose next token depends on every token in its KV cache -----------------------

FAKE_CFG = ModelConfig(family="mixtral", vocab_size=256, hidden_size=8, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=1, n_experts=2, n_groups=1, top_k=1, moe_intermediate_size=8)


def fake_next(context: list[int]) -> int:
    """What the fake model predicts: printable ASCII determined by the sum of the context."""
    return sum(context) % 95 + 32


class ContextSumModel(torch.nn.Module):
    """Writes each new token id into the cache and predicts fake_next(all cached tokens). Any slot
    mapping / block table / preemption bug changes what it reads back and so its output."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # tells the engine the device and dtype
        from actors.model.local_experts import LocalExperts

        self.experts = LocalExperts(FAKE_CFG, {})  # the engine's seam; this model routes nothing to it

    def forward(self, batch, kv):
        kv.k[0].view(-1)[batch.slot_mapping] = batch.input_ids.float()
        cached = kv.k[0][batch.block_tables].flatten(1)  # [B, M * BS]
        visible = torch.arange(cached.shape[1]) < batch.context_lens[:, None]
        total = (cached * visible).sum(1).long()
        target = total % 95 + 32  # [B]
        vocab = torch.arange(FAKE_CFG.vocab_size)
        return -(vocab[None, :] - target[:, None]).abs().float()  # [B, V], peaked at target


@dataclass
class FakeLoaded:
    model: torch.nn.Module
    cfg: ModelConfig
    tokenizer: ByteTokenizer
    name: str = "fake"


def fake_engine(num_kv_blocks=64, block_size=4, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32):
    spec = EngineSpec(max_model_len, num_kv_blocks, block_size, max_num_seqs, max_num_batched_tokens)
    return LLMEngine(FakeLoaded(ContextSumModel(), FAKE_CFG, ByteTokenizer(256)), spec)


def fake_reference(prompt: list[int], n: int) -> list[int]:
    ctx, out = list(prompt), []
    for _ in range(n):
        out.append(fake_next(ctx))
        ctx.append(out[-1])
    return out


def run_all(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None,
            max_steps: int = 2000) -> dict[str, list[RequestOutput]]:
    """Step until idle; `arrivals` maps step number -> requests submitted before that step."""
    arrivals = arrivals or {}
    outs: dict[str, list[RequestOutput]] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < max_steps
    return outs


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text_of(outs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outs)


PROMPTS = [[5, 9, 14], list(range(40, 77)), [3], list(range(100, 121)), [7, 7, 7, 7, 7, 7, 7, 7, 7]]


def test_batched_and_chunked_and_preempted_runs_match_the_reference_on_the_fake_model():
    greedy = SamplingParams(temperature=0, max_tokens=20)
    engine = fake_engine(num_kv_blocks=16, block_size=4, max_num_batched_tokens=16)
    arrivals = {i * 2: [(f"r{i}", p, greedy)] for i, p in enumerate(PROMPTS)}
    outs = run_all(engine, arrivals)
    for i, p in enumerate(PROMPTS):
        assert tokens_of(outs[f"r{i}"]) == fake_reference(p, 20)
    stats = engine.stats()
    assert stats.preemptions > 0  # 16 blocks of 4 cannot hold the five sequences at once
    assert stats.kv_usage == 0 and stats.kv_blocks_free == 16 and stats.running == stats.waiting == 0
    assert stats.tokens_generated == 20 * len(PROMPTS)


def test_outputs_carry_finish_reason_and_usage():
    engine = fake_engine()
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    outs = run_all(engine)["a"]
    assert [o.finished for o in outs] == [False, False, False, True]
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert [o.completion_tokens for o in outs] == [1, 2, 3, 4]
    assert all(o.prompt_tokens == 3 for o in outs)
    assert text_of(outs) == bytes(fake_reference([1, 2, 3], 4)).decode()


def test_stop_token_finishes_with_stop_and_is_counted_but_not_printed():
    prompt = [10, 20, 30]
    ref = fake_reference(prompt, 8)
    engine = fake_engine()
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[4]]))
    outs = run_all(engine)["a"]
    first = ref.index(ref[4])
    assert tokens_of(outs) == ref[: first + 1]
    assert outs[-1].finish_reason == "stop" and outs[-1].completion_tokens == first + 1
    assert text_of(outs) == bytes(ref[:first]).decode()


def test_eos_finishes_with_stop_unless_ignore_eos():
    prompt = [10, 20, 30]
    ref = fake_reference(prompt, 6)
    engine = fake_engine()
    engine.eos_token_ids = frozenset({ref[2]})
    engine.add_request("eos", prompt, SamplingParams(temperature=0, max_tokens=6))
    engine.add_request("ignore", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outs = run_all(engine)
    assert outs["eos"][-1].finish_reason == "stop" and len(tokens_of(outs["eos"])) == ref.index(ref[2]) + 1
    assert outs["ignore"][-1].finish_reason == "length" and tokens_of(outs["ignore"]) == ref


def test_stop_string_finishes_with_stop_and_is_cut_from_the_text():
    prompt = [33, 44, 55]
    full = bytes(fake_reference(prompt, 30)).decode()
    stop = full[10:13]
    cut = full.find(stop)
    engine = fake_engine()
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop, "never-there"]))
    outs = run_all(engine)["a"]
    assert outs[-1].finish_reason == "stop"
    assert text_of(outs) == full[:cut]
    assert outs[-1].completion_tokens == cut + len(stop)  # generation ends on the stop's last token


def test_abort_frees_every_block_wherever_the_request_is():
    engine = fake_engine(num_kv_blocks=32, max_num_seqs=1)
    engine.add_request("running", list(range(30)), SamplingParams(max_tokens=50))
    engine.add_request("queued", [1, 2], SamplingParams(max_tokens=5))
    engine.step()
    stats = engine.stats()
    assert stats.running == 1 and stats.waiting == 1 and stats.kv_usage > 0
    out = engine.abort_request("running")
    assert out.finished and out.finish_reason == "abort" and out.new_token_ids == []
    assert engine.stats().kv_usage == 0
    assert engine.abort_request("queued").finish_reason == "abort"
    assert engine.abort_request("unknown") is None
    assert not engine.has_unfinished()
    assert engine.stats().kv_blocks_free == 32


def test_stats_follow_the_queue_and_the_batch():
    engine = fake_engine(num_kv_blocks=32, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3))
    s0 = engine.stats()
    assert (s0.waiting, s0.running, s0.kv_usage, s0.steps) == (3, 0, 0.0, 0)
    engine.step()
    s1 = engine.stats()
    assert (s1.waiting, s1.running, s1.steps, s1.tokens_generated) == (1, 2, 1, 2)
    assert s1.kv_blocks_free == 32 - 4 and s1.kv_usage == pytest.approx(4 / 32)


def test_requests_that_cannot_fit_are_rejected_with_a_reason():
    engine = fake_engine(num_kv_blocks=8, block_size=4, max_model_len=40)
    with pytest.raises(RequestRejected, match="context length"):
        engine.add_request("a", list(range(30)), SamplingParams(max_tokens=11))
    with pytest.raises(RequestRejected, match="context length"):
        engine.add_request("a", list(range(40)), SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="KV cache"):  # 8 blocks of 4 hold 32 tokens
        engine.add_request("a", list(range(30)), SamplingParams(max_tokens=5))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(RequestRejected, match="vocabulary"):
        engine.add_request("a", [1, 256], SamplingParams())
    assert not engine.has_unfinished()
    engine.add_request("a", list(range(30)), SamplingParams(max_tokens=2))
    with pytest.raises(RequestRejected, match="already"):
        engine.add_request("a", [1], SamplingParams(max_tokens=2))
    assert issubclass(RequestRejected, ValueError)


def test_max_tokens_none_runs_to_the_context_length():
    engine = fake_engine(max_model_len=24)
    engine.add_request("a", [1] * 20, SamplingParams(temperature=0, max_tokens=None))
    outs = run_all(engine)["a"]
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 4


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    params = SamplingParams(temperature=1.0, top_k=40, seed=7, max_tokens=16)
    alone = fake_engine()
    alone.add_request("s", [1, 2, 3], params)
    solo = tokens_of(run_all(alone)["s"])

    crowded = fake_engine(num_kv_blocks=20)
    arrivals = {0: [("m0", [9] * 12, SamplingParams(temperature=1.0, max_tokens=20))],
                2: [("s", [1, 2, 3], params), ("m1", [4, 4], SamplingParams(temperature=0.5, seed=3, max_tokens=9))],
                3: [("m2", list(range(30)), SamplingParams(temperature=0, max_tokens=12))]}
    outs = run_all(crowded, arrivals)
    assert tokens_of(outs["s"]) == solo
    assert solo != fake_reference([1, 2, 3], 16)  # it really sampled

    other = fake_engine()
    other.add_request("s", [1, 2, 3], SamplingParams(temperature=1.0, top_k=40, seed=8, max_tokens=16))
    assert tokens_of(run_all(other)["s"]) != solo


# ---- the real model: batched engine == single-sequence greedy reference --------------------------


@pytest.fixture(scope="module")
def tiny():
    from actors.weights.loader import load_model

    torch.manual_seed(0)
    return load_model("preset:tiny-moge", "float32", "cpu")


@pytest.fixture(scope="module")
def tiny_prompts(tiny):
    texts = ["The cat", "x", "Mixture of grouped experts balances load across devices.", "0123456789" * 3]
    return [tiny.tokenizer.encode(t) for t in texts]


MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny_reference(tiny, tiny_prompts):
    from actors.model.reference import greedy_reference

    return [greedy_reference(tiny, p, MAX_NEW) for p in tiny_prompts]


@pytest.mark.parametrize(
    "case, kv_blocks, batched_tokens, stagger",
    [("together", 64, 256, 0), ("staggered-chunked", 64, 16, 3), ("preempting", 9, 32, 1)],
)
def test_tiny_moge_greedy_batched_equals_reference(tiny, tiny_prompts, tiny_reference, case, kv_blocks,
                                                   batched_tokens, stagger):
    spec = EngineSpec(max_model_len=128, num_kv_blocks=kv_blocks, block_size=8, max_num_seqs=8,
                      max_num_batched_tokens=batched_tokens)
    engine = LLMEngine(tiny, spec)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(tiny_prompts):
        arrivals.setdefault(i * stagger, []).append((f"r{i}", p, params))
    outs = run_all(engine, arrivals)
    for i, ref in enumerate(tiny_reference):
        assert tokens_of(outs[f"r{i}"]) == ref, f"{case}: prompt {i}"
    if case == "preempting":
        assert engine.stats().preemptions > 0
    assert engine.stats().kv_usage == 0


def test_tiny_moge_seeded_sampling_ignores_batch_mates(tiny, tiny_prompts):
    spec = EngineSpec(max_model_len=128, num_kv_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=2024, max_tokens=10, ignore_eos=True)
    alone = LLMEngine(tiny, spec)
    alone.add_request("s", tiny_prompts[0], params)
    solo = tokens_of(run_all(alone)["s"])
    crowded = LLMEngine(tiny, spec)
    mates = {0: [("m0", tiny_prompts[2], SamplingParams(temperature=1.0, max_tokens=12))],
             1: [("s", tiny_prompts[0], params)],
             2: [("m1", tiny_prompts[3], SamplingParams(temperature=0, max_tokens=5))]}
    assert tokens_of(run_all(crowded, mates)["s"]) == solo


# ---- building an engine from the configuration ------------------------------------------------


def tiny_config(**engine):
    from cluster.config import MogeConfig

    return MogeConfig.load(env={}, model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32",
                                          "max_model_len": 64}, engine={"kv_block_size": 16, **engine})


def test_build_engine_sizes_the_kv_cache_from_the_config():
    from cluster.replica.assemble import build_engine
    from actors.model.kv_cache import bytes_per_block

    engine, loaded = build_engine(tiny_config(num_kv_blocks=10))
    assert engine.spec.num_kv_blocks == 10 and engine.spec.max_model_len == 64 and engine.kv.num_blocks == 10
    per_block = bytes_per_block(loaded.cfg, 16, torch.float32)
    engine, _ = build_engine(tiny_config(kv_cache_bytes=7 * per_block + per_block // 2))
    assert engine.spec.num_kv_blocks == 7
    engine, _ = build_engine(tiny_config(kv_cache_fraction=0.5, max_num_seqs=3))
    assert engine.spec.num_kv_blocks == 3 * 4  # never more than max_num_seqs full-length sequences
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        build_engine(tiny_config(kv_cache_bytes=per_block))


def test_build_engine_defaults_the_context_length_to_the_model():
    from cluster.replica.assemble import build_engine
    from cluster.config import MogeConfig

    config = MogeConfig.load(env={}, model={"device": "cpu", "dtype": "float32"}, engine={"num_kv_blocks": 4})
    engine, loaded = build_engine(config)
    assert engine.spec.max_model_len == loaded.cfg.max_position_embeddings
    engine.add_request("a", loaded.tokenizer.encode("hi"), SamplingParams(temperature=0, max_tokens=3))
    assert tokens_of(run_all(engine)["a"])  # it serves


def test_the_step_batch_of_decodes_next_to_a_prefill_chunk():
    engine = fake_engine(num_kv_blocks=32, block_size=4)
    for i, p in enumerate([[1] * 7, [2] * 4, [3] * 13]):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8))
    engine.step()  # prefill; every sequence now has one token to decode
    engine.add_request("r3", [4] * 6, SamplingParams(max_tokens=8))
    scheduled = engine.scheduler.schedule()
    assert scheduled.num_new_tokens == [1, 1, 1, 6]
    batch = engine.runner.prepare(scheduled)
    seqs = scheduled.seqs
    assert batch.positions.tolist() == [7, 4, 13, 0, 1, 2, 3, 4, 5]
    assert batch.context_lens.tolist() == [8, 5, 14, 6]
    assert batch.query_start.tolist() == [0, 1, 2, 3, 9] and batch.logits_index.tolist() == [0, 1, 2, 8]
    assert batch.input_ids.tolist()[:3] == [s.token_ids[-1] for s in seqs[:3]] and batch.max_query == 6
    want_slots = [s.block_table[p // 4] * 4 + p % 4 for s, p in zip(seqs, [7, 4, 13])]
    want_slots += [seqs[3].block_table[p // 4] * 4 + p % 4 for p in range(6)]
    assert batch.slot_mapping.tolist() == want_slots
    assert batch.block_tables[1, : len(seqs[1].block_table)].tolist() == seqs[1].block_table