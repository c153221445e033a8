"""The model runner: from a scheduled batch to last-token logits on the device.

It owns what sits between the scheduler and the model: the paged KV cache tensors, batch preparation
(flattening the scheduled sequences into one StepBatch, copied to the device once), the step
boundary at which a new placement epoch takes effect, and how the step runs — a pure-decode step as
a CUDA-graph replay (actors/engine/graphs/cuda_graphs.py: CUDA device, experts in this process),
otherwise the model whole, or as two ping-pong micro-batches when the routed experts are remote
(actors/engine/ping_pong.py).

Shape legend: T = tokens in the step, B = sequences in the step, M = widest block table, V = vocab.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from actors.engine.ping_pong import PingPongRunner, micro_batch_tokens
from actors.engine.scheduler import ScheduledBatch
from actors.engine.sequence import Sequence
from actors.model.expert_compute import ExpertCompute, StepRerun
from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model,
        cfg,
        num_kv_blocks: int,
        block_size: int,
        ping_pong: bool = False,
        cuda_graphs: bool = False,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
        cuda_graph_memory_mb: int = 4096,
    ) -> None:
        if not isinstance(model.experts, ExpertCompute):  # the engine calls only what the seam declares
            raise TypeError(f"model.experts must be an ExpertCompute, got {type(model.experts).__name__}")
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        weight = next(model.parameters(), None)
        self.device = weight.device if weight is not None else torch.device("cpu")
        self.dtype = weight.dtype if weight is not None else torch.float32
        use_graphs = cuda_graphs and self._graphs_possible(ping_pong)
        self.kv = PagedKVCache.for_model(self.cfg, num_kv_blocks, block_size, self.dtype, self.device, use_graphs)
        self.ping_pong = PingPongRunner(model) if ping_pong else None
        self.graphs = None
        if use_graphs:
            from actors.engine.graphs.cuda_graphs import DecodeGraphs

            max_blocks = -(-max_model_len // block_size)
            pp = self.ping_pong
            self.graphs = DecodeGraphs(model, self.kv, max_num_seqs, max_blocks, cuda_graph_memory_mb,
                                       forward=pp.forward if pp is not None else None,
                                       micro_batches=micro_batch_tokens if pp is not None else None)
            self.graphs.capture()

    def _graphs_possible(self, ping_pong: bool) -> bool:
        if self.device.type != "cuda":
            return False  # CPU and NPU decode eagerly
        experts = self.model.experts
        # ping-pong is captured only with experts that take part in the capture (the step lane)
        if (ping_pong and not experts.graph_carrier) or not experts.graph_safe:
            log.info("decode runs eagerly: the routed experts are not capturable in a CUDA graph (remote or partial)")
            return False
        return True

    def execute(
        self, scheduled: ScheduledBatch, prompt_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one step: [B, V] logits, one row per scheduled sequence, and [E, V] logits of the
        flattened-token rows `prompt_rows` (prompt log-probabilities; None when none are asked)."""
        boundary = self.model.experts.on_step_boundary  # a new placement epoch takes effect here, never inside a step
        if not prompt_rows and self.graphs is not None and self.graphs.covers(scheduled.num_new_tokens):
            boundary()
            try:
                return self.graphs.run(scheduled.seqs), None
            except StepRerun:  # the lane failed during the replay: the step again, eagerly, below
                log.warning("captured step failed on the expert lane; re-running it eagerly")
        batch = self.prepare(scheduled)
        b = batch.num_seqs
        if prompt_rows:
            # The head also runs over the extra rows: the same forward with a longer logits_index.
            # Rare (scoring requests' prefills), so it takes the plain path, not ping-pong.
            extra = torch.tensor(prompt_rows, dtype=torch.long).to(self.device)
            batch = dataclasses.replace(batch, logits_index=torch.cat([batch.logits_index, extra]))
        boundary()
        plain = bool(prompt_rows)
        try:
            logits = self._forward(batch, plain)
        except StepRerun:  # a remote transport failed mid-step on the device: once more, routed around it
            boundary()
            logits = self._forward(batch, plain)
        return (logits[:b], logits[b:]) if prompt_rows else (logits, None)

    def _forward(self, batch: StepBatch, plain: bool = False) -> torch.Tensor:
        if self.ping_pong is not None and not plain:
            return self.ping_pong.forward(batch, self.kv)
        return self.model(batch, self.kv)

    # ---- batch preparation --------------------------------------------------------------------

    def prepare(self, scheduled: ScheduledBatch) -> StepBatch:
        """The step's StepBatch on the model's device."""
        if all(n == 1 for n in scheduled.num_new_tokens):
            return self._decode_batch(scheduled.seqs)
        return self._to_device(self._mixed_batch(scheduled))

    def _decode_batch(self, seqs: list[Sequence]) -> StepBatch:
        """The common step, one new token per sequence: built as one flat Python list, turned into
        one tensor and copied to the device once; the fields are views into it."""
        bs = self.block_size
        b = len(seqs)
        pos = [s.num_computed_tokens for s in seqs]  # [B] the new token's position
        width = max(len(s.block_table) for s in seqs)
        flat = [s.token_ids[p] for s, p in zip(seqs, pos)]  # input_ids
        flat += pos  # positions
        flat += range(b + 1)  # query_start
        flat += [p + 1 for p in pos]  # context_lens
        for s in seqs:  # block_tables, padded with block 0
            flat += s.block_table
            flat += [0] * (width - len(s.block_table))
        flat += [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]  # slot_mapping
        flat += range(b)  # logits_index
        t = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)
        ids, positions, query_start, context_lens, tables, slots, logits_index = t.split(
            [b, b, b + 1, b, b * width, b, b]
        )
        return StepBatch(ids, positions, query_start, context_lens, tables.view(b, width), slots, logits_index)

    def _mixed_batch(self, scheduled: ScheduledBatch) -> StepBatch:
        """Prefill chunks (and decodes next to them), on the host."""
        seqs, counts = scheduled.seqs, scheduled.num_new_tokens
        starts = [s.num_computed_tokens for s in seqs]
        ids = list(itertools.chain.from_iterable(s.token_ids[c : c + n] for s, c, n in zip(seqs, starts, counts)))
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])  # [B, M]

        count = torch.tensor(counts)  # [B]
        start = torch.tensor(starts)  # [B]
        query_start = torch.zeros(len(seqs) + 1, dtype=torch.long)
        torch.cumsum(count, 0, out=query_start[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), count)  # [T]
        positions = torch.arange(len(ids)) + (start - query_start[:-1])[seq_of_token]  # [T]
        bs = self.block_size
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs  # [T]
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=positions,
            query_start=query_start,
            context_lens=start + count,
            block_tables=tables,
            slot_mapping=slots,
            logits_index=query_start[1:] - 1,
        )

    def _to_device(self, batch: StepBatch) -> StepBatch:
        """One host-to-device copy for all seven index tensors instead of seven small ones."""
        if self.device.type == "cpu":
            return batch
        fields = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
        flat = torch.cat([t.reshape(-1) for t in fields]).to(self.device, non_blocking=True)
        parts = flat.split([t.numel() for t in fields])
        return StepBatch(*(part.view(t.shape) for part, t in zip(parts, fields)))
