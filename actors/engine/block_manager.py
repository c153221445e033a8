"""Paged KV memory: a fixed pool of blocks of `block_size` token slots, lent to sequences, with
automatic prefix caching.

A sequence's block table lists its blocks in token order, so token i lives in slot
block_table[i // block_size] * block_size + i % block_size. Blocks are handed out on demand as a
sequence grows and its references come back when it finishes, is aborted, or is preempted.

Prefix caching: once every slot of a block holds computed K/V, the block gets a hash that names
its whole prefix — block_hash(hash of the block before it, the block's token ids) — so two
sequences whose first k blocks hold the same tokens have the same k hashes. K/V at a position
depend only on the tokens up to it, so such a block can be shared: a newly admitted sequence takes
references on the cached blocks of its longest matching prefix and starts computing after them.
Shared blocks are never written again (a sequence only writes at positions past its computed ones).
A block whose last reference goes away keeps its hash and contents and waits in an LRU list; it is
reclaimed (and forgets its hash) only when no never-cached free block is left. Counting it as free
keeps admission and preemption exactly as without caching.

Hashes are 128-bit BLAKE2b (hashlib, no dependency): a collision would silently hand one request
another's K/V, so a fast non-cryptographic hash such as Python's hash() is not good enough.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from actors.engine.sequence import PENDING, Sequence


def block_hash(parent: bytes | None, token_ids: Seq[int]) -> bytes:
    """The hash of a full block: it covers the parent's hash, so it names the whole prefix."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks  # sequences holding each block
        # free blocks with no hash: a stack, the most recently freed is reused first (warm in caches)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # free blocks that still hold a cached prefix, least recently released first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}  # block -> its hash (full, computed blocks only)
        self._cached: dict[bytes, int] = {}  # hash -> the block holding it
        # prompt tokens looked up at first admission, and how many of them were cached
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0  # cached blocks reclaimed for new contents

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: never-cached ones plus cached ones that can be reclaimed."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, 0..1 (cached but unreferenced blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that `num_new_tokens` more tokens after the computed ones fit."""
        want = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks to the sequence's table so its next `num_new_tokens` tokens have slots."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"{seq.request_id}: needs {need} KV blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. The table is walked backwards so a prefix's tail blocks
        are reclaimed before its head, which more requests share."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    # ---- prefix caching -----------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of a sequence that holds none yet. Never the
        whole context: its last token is always computed again, so the step has logits to sample.
        None for a sequence that still needs logits of its prompt positions (prompt log-probs)."""
        if not self.enable_prefix_caching or seq.needs_prompt_logits:
            return []
        hit: list[int] = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def admission_cost(self, seq: Sequence, hit: list[int], num_new_tokens: int) -> int:
        """Free blocks that admitting `seq` over the cached blocks `hit` with `num_new_tokens` to
        compute takes: the new blocks plus the hit blocks nobody holds (they leave the free pool)."""
        new = self.blocks_for(len(hit) * self.block_size + num_new_tokens) - len(hit)
        return new + sum(1 for b in hit if self._refs[b] == 0)

    def admit(self, seq: Sequence, hit: list[int], num_new_tokens: int) -> None:
        """Start a sequence that holds no blocks: share the cached `hit` blocks (they count as
        computed), then allocate for `num_new_tokens` more. Check admission_cost first."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in hit:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = list(hit)
        seq.num_hashed_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        if seq.num_cached_tokens is None:  # first admission: what the response reports
            seq.num_cached_tokens = seq.num_computed_tokens
            self.queried_tokens += seq.num_prompt_tokens
            self.hit_tokens += seq.num_computed_tokens
        self.allocate(seq, num_new_tokens)

    def commit(self, seq: Sequence) -> None:
        """Offer the sequence's newly full, computed blocks to the cache (call after a step)."""
        if not self.enable_prefix_caching:
            return
        # tokens still in flight (async scheduling) have no id yet: their block waits for the next commit
        full = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending) // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            # the same prefix computed twice (two requests admitted together) keeps the first copy;
            # this one stays unhashed and goes back to the plain free list when released
            if h not in self._cached and block not in self._hash_of:
                self._cached[h] = block
                self._hash_of[block] = h
        seq.num_hashed_blocks = full

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The chain hashes of the sequence's first n full blocks (memoised on the sequence: its
        tokens never change, only grow)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < n:
            i = len(hashes)
            ids = seq.token_ids[i * bs : (i + 1) * bs]
            if PENDING in ids:  # never memoise a hash of a token not sampled yet
                raise RuntimeError(f"{seq.request_id}: block {i} holds a token still in flight")
            hashes.append(block_hash(hashes[-1] if hashes else None, ids))
        return hashes[:n]

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # reclaim the least recently released cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block
