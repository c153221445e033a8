import pytest

from actors.engine.block_manager import BlockManager
from actors.engine.output.detokenizer import IncrementalDetokenizer
from actors.engine.sampling_params import SamplingParams
from actors.engine.sequence import Sequence
from actors.weights.tokenizer import ByteTokenizer


def make_seq(rid: str, n_prompt: int) -> Sequence:
    prompt = list(range(n_prompt))
    return Sequence(rid, list(prompt), n_prompt, SamplingParams(), n_prompt + 16, 0,
                    IncrementalDetokenizer(ByteTokenizer(), prompt, []))


def test_blocks_are_added_only_when_a_block_boundary_is_crossed():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", 5)
    assert bm.blocks_needed(seq, 5) == 2
    bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    for _ in range(3):  # positions 5, 6, 7 fit in the second block
        assert bm.blocks_needed(seq, 1) == 0
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
    assert len(seq.block_table) == 2
    bm.allocate(seq, 1)  # position 8 opens the third block
    assert len(seq.block_table) == 3
    assert bm.usage == pytest.approx(3 / 8)


def test_sequences_get_disjoint_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq("a", 5), make_seq("b", 6)
    bm.allocate(a, 5)
    bm.allocate(b, 6)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    c = make_seq("c", 12)  # after freeing everything, the whole pool is usable again
    bm.allocate(c, 12)
    assert sorted(c.block_table) == list(range(6))


def test_allocation_beyond_the_pool_is_refused_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq("a", 9)
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 9)
    assert bm.num_free_blocks == 2 and seq.block_table == []
    assert bm.can_allocate(seq, 8)
