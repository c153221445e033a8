"""One request's state inside the engine: its tokens, how many of them are in the KV cache, and
where in the cache they live (some blocks may be shared with other sequences: prefix caching).

A sequence is WAITING (queued, or preempted and waiting to be recomputed), RUNNING (owns KV blocks
and is scheduled every step), or FINISHED. `num_computed_tokens` counts the tokens whose K/V are
written (or queued on the device to be); the scheduler feeds the model the rest (a prefill chunk,
or the one new token of a decode).

Async scheduling: a token sampled by a step still in flight sits in token_ids as PENDING until the
step's results reach the host; the next step already feeds it to the model, read on the device
from the sampled-token buffer (`pending_row`). Only trailing tokens are ever PENDING.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from typing import Any

from actors.engine.sampling_params import SamplingParams


PENDING = -1  # a token id sampled on the device that the host does not have yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    max_total_tokens: int  # prompt + completion cap (max_tokens, bounded by the context length)
    arrival: int  # admission order: FCFS and "newest is preempted first"
    text_stream: Any = None  # TextStream (actors/engine/output/text_stream.py) when the engine makes the text
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # physical KV block ids, in order
    # prefix caching (actors/engine/block_manager.py): chain hashes of the full blocks worked out so
    # far (a function of token_ids, so kept across preemption), how many of block_table's blocks
    # have been offered to the cache, and the prompt tokens found cached at first admission
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_cached_tokens: int | None = None
    finish_reason: str | None = None
    slot: int | None = None  # sampling-state row (actors/engine/sampling/slots.py) from first sample to finish
    matcher: Any = None  # grammar matcher (llguidance) when the output is constrained
    # the matcher's next-token mask, computed on a grammar thread (a Future of a [V/32] int32 row);
    # the scheduler steps the sequence only once it is done, so no step waits for grammar work
    grammar_mask: Any = None
    prompt_logprobs: list | None = None  # TokenLogprob per prompt token (None first) when asked for
    prompt_logprobs_sent: bool = False
    pending_logprobs: list = field(default_factory=list)  # TokenLogprobs not yet handed out
    scheduled_at: float | None = None  # monotonic time a step first ran it (queue time ends)
    first_token_at: float | None = None  # monotonic time its first token was sampled
    pending_row: int | None = None  # row of the last PENDING token in the runner's sampled-token buffer

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt log-probabilities asked for and not all computed yet (no prefix-cache skipping)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Trailing tokens still in flight (0, 1, or 2 between a launch and the previous step's results)."""
        n = 0
        for t in reversed(self.token_ids):
            if t != PENDING:
                break
            n += 1
        return n

    @property
    def awaiting_last_token(self) -> bool:
        """Its final token (max_tokens) is in flight: nothing left to schedule."""
        return self.num_tokens >= self.max_total_tokens and self.num_pending > 0

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption: the KV is gone; prompt and generated tokens are prefilled again later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_hashed_blocks = 0
        self.status = SequenceStatus.WAITING

    def grammar_ready(self) -> bool:
        """Whether this sequence can take part in a step: unconstrained, or its mask is computed."""
        return self.grammar_mask is None or self.grammar_mask.done()
