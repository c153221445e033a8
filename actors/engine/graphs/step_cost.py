"""What a captured step costs by token count, measured once at start-up, and the per-step token cap
the scheduler takes from it: a step with prompt chunks next to running decodes costs at most
`ratio` times a full decode step.

The profile replays the graphs over realistic steps built in the still empty KV cache: the
reference is max_num_seqs decodes at a moderate context (`context` keys each, their own
blocks, so attention reads real memory), and each larger bucket is those decodes plus one prompt
chunk filling it, every token with its own KV slot and a random id (a shared slot or a shared id
would make the hidden states alike and the routed experts few: a step far cheaper than a real one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from actors.engine.steps.step_inputs import StepInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCosts:
    ms: dict[int, float]  # step tokens -> median replay time
    reference: int  # the full decode bucket the ratio refers to
    context: int  # keys of each decode in the profile
    ratio: float
    cap: int  # the most tokens a step with decodes may hold

    def describe(self) -> str:
        table = ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(self.ms.items()))
        return (f"step cost by tokens (ms) {table}; cap {self.cap} tokens = the largest step within {self.ratio}x "
                f"the {self.reference}-decode step at context {self.context} ({self.ms[self.reference]:.2f} ms)")


def profile_inputs(decodes: int, context: int, prompt: int, block_size: int, vocab: int,
                   gen: torch.Generator) -> StepInputs:
    """`decodes` sequences at `context` keys and one new prompt of `prompt` tokens, over consecutive
    blocks of the cache from block 0."""
    per_seq = -(-context // block_size)
    ids = torch.randint(0, vocab, (decodes + prompt,), generator=gen).tolist()
    positions, slots, tables, ctx, qs = [], [], [], [], [0]
    block = 0
    for _ in range(decodes):
        table = list(range(block, block + per_seq))
        block += per_seq
        p = context - 1
        positions.append(p)
        slots.append(table[p // block_size] * block_size + p % block_size)
        tables.append(table)
        ctx.append(context)
        qs.append(qs[-1] + 1)
    if prompt:
        table = list(range(block, block + -(-prompt // block_size)))
        positions += range(prompt)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(prompt)]
        tables.append(table)
        ctx.append(prompt)
        qs.append(qs[-1] + prompt)
    return StepInputs(ids, positions, slots, None, qs, ctx, [q - 1 for q in qs[1:]], tables, max(1, prompt))


def max_prompt_tokens(graphs) -> int:
    """The longest prompt chunk one profile step may hold: one sequence, so within max_model_len
    and the block-table width."""
    return min(graphs.kv.max_seq_len - 1, graphs.tables.shape[1] * graphs.kv.block_size)


def profile_sizes(buckets: list[int], reference: int, max_prompt: int) -> list[int]:
    """The buckets to time: the reference and up, while the prompt chunk that fills one fits."""
    return [tp for tp in buckets if reference <= tp <= reference + max_prompt]


def profile_step_costs(graphs, ratio: float, context: int = 1024, replays: int = 3, seed: int = 0) -> StepCosts | None:
    """Time the buckets from the largest decode one upwards until a step costs more than `ratio`
    times it. None when there is nothing to measure (no graph of a full decode step)."""
    decode = [tp for tp in graphs.graphs if tp <= graphs.max_seqs]
    if not decode or ratio <= 0:
        return None
    reference = max(decode)
    kv = graphs.kv
    bs = kv.block_size
    sizes = profile_sizes(sorted(graphs.graphs), reference, max_prompt_tokens(graphs))
    # the decodes and the largest prompt must fit the (still empty) cache
    room = kv.num_blocks * bs - (sizes[-1] - reference) - bs
    context = max(1, min(context, kv.max_seq_len // 2, graphs.tables.shape[1] * bs, room // reference))
    vocab = graphs.model.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    costs: dict[int, float] = {}
    cap = reference
    for tp in sizes:
        graphs.run(profile_inputs(reference, context, tp - reference, bs, vocab, gen))  # fills and warms
        costs[tp] = graphs.time_replay(tp, replays)
        if costs[tp] > ratio * costs[reference]:
            break
        cap = tp
    result = StepCosts(costs, reference, context, ratio, cap)
    log.info("scheduler: %s", result.describe())
    return result
