"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step the running decodes go first, oldest first, one token each. Then prompt tokens, within
the step's prompt budget: unfinished prefills of running sequences (oldest first) take their next
chunk, then waiting sequences are admitted in arrival order (FCFS: the first one that does not fit
stops admission, nobody overtakes it) while there are KV blocks, sequence slots and budget left. A
prompt longer than the budget is prefilled in chunks over several steps.

The prompt budget keeps decodes fast under load: with decodes running, a step holds at most
`step_token_cap` tokens in all (the engine sets it from a start-up profile of the captured steps:
the token count at which a step costs `step_cost_ratio` times a full decode step), but never fewer
than `min_prompt_tokens` prompt tokens, so a prompt always progresses. With no decode running the
whole max_num_batched_tokens goes to prompts (nobody waits on the step).

When a running sequence needs a KV block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt + tokens generated so far are prefilled again). The oldest sequence therefore always
progresses, so the engine never deadlocks as long as one request fits the whole cache, which
add_request guarantees.

Prefix caching: a sequence admitted from the queue starts after the longest prefix of full blocks
already in the cache (BlockManager.cached_prefix); only the rest counts against the token budget.
A preempted sequence usually finds its own released blocks still cached when it comes back.

Ordering invariant kept by construction: `running` is sorted by arrival, `waiting` too, and every
running sequence arrived before every waiting one except preempted ones, which are put back first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from actors.engine.block_manager import BlockManager
from actors.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each sequence feeds this step

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    def remove(self, seq: Sequence) -> int:
        """Take a preempted sequence out again: the tokens it had (0 if it was not in)."""
        for i, s in enumerate(self.seqs):
            if s is seq:
                del self.seqs[i]
                return self.num_new_tokens.pop(i)
        return 0


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # admission keeps this many blocks spare for running decodes, so that admitting a request
        # rarely forces a preemption on the very next step; waived when nothing runs (no deadlock)
        self.watermark_blocks = max(1, blocks.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_token_cap: int | None = None  # tokens per step while decodes run (None: no cap)
        self.min_prompt_tokens = 16

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False

        prefilling: list[Sequence] = []  # running sequences with a prompt (or recompute) chunk to go
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            i += 1
            if seq.awaiting_last_token:  # async scheduling: its final token is in flight, nothing to run
                continue
            if not seq.grammar_ready():  # its grammar mask is still being computed: the rest go on
                continue
            if seq.num_uncomputed_tokens > 1:
                prefilling.append(seq)
                continue
            while not self.blocks.can_allocate(seq, 1):
                victim = self.running[-1]  # the newest; never one already visited (index < i)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: it was the last running one
            self.blocks.allocate(seq, 1)
            batch.add(seq, 1)
            budget -= 1

        decodes = len(batch)
        if decodes and self.step_token_cap is not None:
            budget = min(budget, max(self.min_prompt_tokens, self.step_token_cap - decodes))
        for seq in prefilling:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below for an older prefill
            n = self._fit(seq, min(seq.num_uncomputed_tokens, budget))
            while n == 0:  # no block left: the newest running sequence makes room (it may be scheduled)
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                budget += batch.remove(victim)
                if victim is seq:
                    break
                n = self._fit(seq, min(seq.num_uncomputed_tokens, budget))
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.blocks.allocate(seq, n)
            batch.add(seq, n)
            budget -= n

        # after a preemption the cache is full: admitting now would only preempt again
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            # the first waiting sequence that could sample now: one whose grammar mask is still being
            # computed waits for it here, not in the step (the others keep their order)
            seq = next((s for s in self.waiting if s.grammar_ready()), None)
            if seq is None:
                break
            hit = self.blocks.cached_prefix(seq)  # waiting sequences hold no blocks
            n = min(seq.num_tokens - len(hit) * self.blocks.block_size, budget)
            spare = self.watermark_blocks if self.running else 0
            if self.blocks.admission_cost(seq, hit, n) + spare > self.blocks.num_free_blocks:
                break
            self.waiting.remove(seq)
            self.blocks.admit(seq, hit, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _fit(self, seq: Sequence, n: int) -> int:
        """The most of `n` new tokens the free blocks hold for `seq` (a chunk may be cut short)."""
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size - seq.num_computed_tokens
        return max(0, min(n, room))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the running set for good and return its KV blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
