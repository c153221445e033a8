"""The model runner: from a scheduled batch to last-token logits on the device.

It owns what sits between the scheduler and the model: the paged KV cache tensors, the step's index
data (actors/engine/steps/step_inputs.py: built on the host, copied to the device once, never
waiting for it), the buffer of the last sampled tokens that in-flight decode rows read their ids
from (async scheduling), the step boundary at which a new placement epoch takes effect, and how the
step runs — as a CUDA-graph replay per token-count bucket (actors/engine/graphs/step_graphs.py:
CUDA device, experts in this process: decode and mixed prefill+decode steps; remote experts over the
step lane: decode steps), otherwise the model whole, or as two ping-pong micro-batches when the
routed experts are remote (actors/engine/ping_pong.py).

Shape legend: T = tokens in the step, B = sequences in the step, M = widest block table, V = vocab.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from actors.engine.ping_pong import PingPongRunner, micro_batch_tokens
from actors.engine.scheduler import ScheduledBatch
from actors.device import h2d
from actors.engine.steps.step_inputs import build_inputs, to_step_batch
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
        max_num_batched_tokens: int = 0,
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
        if max_model_len:
            self.kv.max_seq_len = max_model_len
        # the last step's sampled tokens, by sampling row: where in-flight decode rows read their ids
        self.sampled = torch.zeros(max(1, max_num_seqs), dtype=torch.long, device=self.device)
        self.ping_pong = PingPongRunner(model) if ping_pong else None
        self.graphs = None
        if use_graphs:
            from actors.engine.graphs.step_graphs import StepGraphs

            max_blocks = -(-max_model_len // block_size)
            pp = self.ping_pong
            self.graphs = StepGraphs(model, self.kv, max_num_seqs, max(max_num_batched_tokens, max_num_seqs),
                                     max_blocks, cuda_graph_memory_mb, self.sampled,
                                     forward=pp.forward if pp is not None else None,
                                     micro_batches=micro_batch_tokens if pp is not None else None,
                                     mixed=pp is None)
            self.graphs.capture()

    def _graphs_possible(self, ping_pong: bool) -> bool:
        if self.device.type != "cuda":
            return False  # CPU and NPU run eagerly
        experts = self.model.experts
        # ping-pong is captured only with experts that take part in the capture (the step lane)
        if (ping_pong and not experts.graph_carrier) or not experts.graph_safe:
            log.info("steps run eagerly: the routed experts are not capturable in a CUDA graph (remote or partial)")
            return False
        return True

    def execute(
        self, scheduled: ScheduledBatch, prompt_rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one step: [B, V] logits, one row per scheduled sequence, and [E, V] logits of the
        flattened-token rows `prompt_rows` (prompt log-probabilities; None when none are asked)."""
        boundary = self.model.experts.on_step_boundary  # a new placement epoch takes effect here, never inside a step
        inputs = build_inputs(scheduled.seqs, scheduled.num_new_tokens, self.block_size)
        if not prompt_rows and self.graphs is not None and self.graphs.covers(scheduled.num_new_tokens):
            boundary()
            try:
                return self.graphs.run(inputs), None
            except StepRerun:  # the lane failed during the replay: the step again, eagerly, below
                log.warning("captured step failed on the expert lane; re-running it eagerly")
        batch = to_step_batch(inputs, self.device, self.sampled)
        b = batch.num_seqs
        if prompt_rows:
            # The head also runs over the extra rows: the same forward with a longer logits_index.
            # Rare (scoring requests' prefills), so it takes the plain path, not ping-pong.
            extra = h2d(torch.tensor(prompt_rows, dtype=torch.long), self.device)
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

    def prepare(self, scheduled: ScheduledBatch) -> StepBatch:
        """The step's StepBatch on the model's device."""
        return to_step_batch(build_inputs(scheduled.seqs, scheduled.num_new_tokens, self.block_size),
                             self.device, self.sampled)

    def publish(self, tokens: torch.Tensor) -> None:
        """The step's sampled tokens [n], by sampling row, for the next step's in-flight decode rows."""
        self.sampled[: tokens.shape[0]].copy_(tokens)
