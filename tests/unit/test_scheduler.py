"""The scheduler alone, with the model replaced by "every fully computed sequence gets a token"."""

from actors.engine.block_manager import BlockManager
from actors.engine.output.detokenizer import IncrementalDetokenizer
from actors.engine.sampling_params import SamplingParams
from actors.engine.scheduler import Scheduler
from actors.engine.sequence import Sequence, SequenceStatus
from actors.weights.tokenizer import ByteTokenizer

_arrival = iter(range(10**6))


def make_seq(rid: str, n_prompt: int) -> Sequence:
    prompt = [7] * n_prompt
    return Sequence(rid, list(prompt), n_prompt, SamplingParams(), 10**6, next(_arrival),
                    IncrementalDetokenizer(ByteTokenizer(), prompt, []))


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule, pretend the model ran, append a token where the whole context is computed."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert 0 < n <= seq.num_uncomputed_tokens
        seq.num_computed_tokens += n
        assert len(seq.block_table) * sched.blocks.block_size >= seq.num_computed_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)
    assert sum(batch.num_new_tokens) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    return {s.request_id: n for s, n in zip(batch.seqs, batch.num_new_tokens)}


def test_admission_is_fcfs_and_bounded_by_max_num_seqs():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(f"r{i}", 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert run_step(sched) == {"r0": 3, "r1": 3}
    assert [s.request_id for s in sched.waiting] == ["r2", "r3"]
    assert run_step(sched) == {"r0": 1, "r1": 1}  # decodes; no slot for r2
    sched.finish(seqs[0], "stop")
    assert seqs[0].block_table == [] and seqs[0].status is SequenceStatus.FINISHED
    assert run_step(sched) == {"r1": 1, "r2": 3}


def test_long_prompt_is_prefilled_in_chunks_next_to_running_decodes():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    short, long = make_seq("short", 2), make_seq("long", 40)
    sched.add(short)
    assert run_step(sched) == {"short": 2}
    sched.add(long)
    chunks = []
    while long.num_completion_tokens == 0:
        step = run_step(sched)
        assert step["short"] == 1  # the running decode is never starved by the prefill
        chunks.append(step["long"])
    assert chunks == [15, 15, 10]


def test_fcfs_a_request_that_does_not_fit_is_not_overtaken():
    sched = Scheduler(BlockManager(7, 4), max_num_seqs=8, max_num_batched_tokens=64)
    assert sched.watermark_blocks == 1
    first = make_seq("first", 8)  # 2 blocks
    sched.add(first)
    run_step(sched)
    big, small = make_seq("big", 20), make_seq("small", 2)  # big: 5 blocks + 1 spare > 5 free
    sched.add(big)
    sched.add(small)
    assert run_step(sched) == {"first": 1}  # small would fit, but it may not overtake big
    assert [s.request_id for s in sched.waiting] == ["big", "small"]
    sched.finish(first, "stop")
    assert run_step(sched) == {"big": 20, "small": 2}


def test_out_of_blocks_preempts_the_newest_so_the_oldest_keeps_going():
    sched = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq("old", 8), make_seq("new", 4)
    sched.add(old)
    sched.add(new)
    assert run_step(sched) == {"old": 8, "new": 4}
    steps = 0
    while sched.num_preemptions == 0:
        step = run_step(sched)
        steps += 1
        assert steps < 20
    assert "old" in step and "new" not in step
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new] and new.num_completion_tokens == steps  # keeps its tokens
    assert sched.blocks.num_free_blocks == 5 - len(old.block_table)
    sched.finish(old, "length")
    # recompute: prompt and generated tokens are prefilled again in one step
    assert run_step(sched) == {"new": 4 + steps}
    assert new.status is SequenceStatus.RUNNING and new.num_completion_tokens == steps + 1


def test_the_newest_preempts_itself_when_an_older_one_took_the_last_block():
    sched = Scheduler(BlockManager(5, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq("old", 7), make_seq("new", 7)  # 2 blocks each, 1 spare left
    sched.add(old)
    sched.add(new)
    assert run_step(sched) == {"old": 7, "new": 7}
    assert run_step(sched) == {"old": 1, "new": 1}  # position 7 still fits in block 2
    assert run_step(sched) == {"old": 1}  # position 8: old takes the spare, new has none
    assert sched.num_preemptions == 1 and list(sched.waiting) == [new]
    # new now needs 3 blocks (9 tokens) plus the spare one; 2 are free, so it waits for old
    assert run_step(sched) == {"old": 1}
    assert sched.blocks.num_free_blocks == 2 and sched.waiting[0] is new


def test_finish_of_a_waiting_sequence_removes_it_from_the_queue():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq("a", 2), make_seq("b", 2)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.finish(b, "abort")
    assert list(sched.waiting) == [] and sched.has_unfinished()
    sched.finish(a, "abort")
    assert not sched.has_unfinished() and sched.blocks.num_free_blocks == 8
