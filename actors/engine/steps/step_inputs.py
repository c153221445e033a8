"""One step's index data, built on the host from the scheduled sequences, and how it reaches the
device without waiting for it.

Shape legend: T = tokens in the step, B = sequences, M = widest block table.

The same plain ints feed both ways a step runs: copied into a StepBatch (eager forward) or into a
CUDA graph's static buffers (actors/engine/graphs/step_graphs.py). A decode row whose input token
was sampled by the step still in flight (async scheduling: its id is not on the host yet, the
sequence holds PENDING there) carries `src` = that token's row in the runner's sampled-token buffer,
and the device reads the id from there (`resolve_ids`), so launching the next step never waits for
the previous one's results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.device import h2d
from actors.engine.sequence import PENDING
from actors.model.step_batch import StepBatch


@dataclass
class StepInputs:
    ids: list[int]  # [T]; 0 where src >= 0
    positions: list[int]  # [T]
    slots: list[int]  # [T] KV slot each token writes
    src: list[int] | None  # [T] row of the sampled-token buffer holding the id, -1 = ids; None: all -1
    query_start: list[int]  # [B + 1]
    context_lens: list[int]  # [B] keys after this step
    logits_rows: list[int]  # [B] each sequence's last token row
    tables: list[list[int]]  # [B] block tables, ragged
    max_query: int  # most new tokens of one sequence

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def width(self) -> int:
        return max(len(t) for t in self.tables)


def build_inputs(seqs, counts: list[int], block_size: int) -> StepInputs:
    """`seqs` with `counts` new tokens each, after their num_computed_tokens."""
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    src: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    pending = False
    t = 0
    for seq, n in zip(seqs, counts):
        c = seq.num_computed_tokens
        table = seq.block_table
        if n == 1:
            token = seq.token_ids[c]
            if token == PENDING:
                pending = True
                ids.append(0)
                src.append(seq.pending_row)
            else:
                ids.append(token)
                src.append(-1)
            positions.append(c)
            slots.append(table[c // bs] * bs + c % bs)
        else:
            chunk = seq.token_ids[c : c + n]
            if PENDING in chunk:  # only a decode's single token can still be in flight
                raise RuntimeError(f"{seq.request_id}: a prefill chunk holds a token not sampled yet")
            ids += chunk
            span = range(c, c + n)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            src += [-1] * n
        t += n
        query_start.append(t)
        context_lens.append(c + n)
    rows = [q - 1 for q in query_start[1:]]
    return StepInputs(ids, positions, slots, src if pending else None, query_start, context_lens, rows,
                      [s.block_table for s in seqs], max(counts))


def resolve_ids(ids: torch.Tensor, src: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """[T] input ids with the in-flight ones read from the sampled-token buffer on the device."""
    return torch.where(src >= 0, sampled[src.clamp(min=0)], ids)


def to_step_batch(inputs: StepInputs, device: torch.device, sampled: torch.Tensor | None) -> StepBatch:
    """The inputs as a StepBatch on `device`: one host-to-device copy of every field."""
    t, b, width = inputs.num_tokens, inputs.num_seqs, inputs.width
    flat = inputs.ids + inputs.positions + inputs.slots + inputs.query_start + inputs.context_lens + inputs.logits_rows
    for table in inputs.tables:
        flat += table
        flat += [0] * (width - len(table))
    if inputs.src is not None:
        flat += inputs.src
    dev = h2d(torch.tensor(flat, dtype=torch.long), device)
    ids, positions, slots, query_start, context_lens, rows, tables, src = dev.split(
        [t, t, t, b + 1, b, b, b * width, t if inputs.src is not None else 0])
    if inputs.src is not None:
        ids = resolve_ids(ids, src, sampled)
    return StepBatch(ids, positions, query_start, context_lens, tables.view(b, width), slots, rows,
                     max_query=inputs.max_query)
