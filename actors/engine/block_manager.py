"""Paged KV memory: a fixed pool of blocks of `block_size` token slots, lent to sequences.

A sequence's block table lists its blocks in token order, so token i lives in slot
block_table[i // block_size] * block_size + i % block_size. Blocks are handed out on demand as a
sequence grows and all come back when it finishes, is aborted, or is preempted.
"""

from __future__ import annotations

from actors.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # a stack: the most recently freed block is reused first (still warm in caches)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks lent out, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that `num_new_tokens` more tokens after the computed ones fit."""
        want = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks to the sequence's table so its next `num_new_tokens` tokens have slots."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"{seq.request_id}: needs {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
