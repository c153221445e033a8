"""What one engine step hands the model: the flattened tokens of every scheduled sequence.

Shape legend: T = tokens in the step (all sequences, prefill chunks and decode tokens flattened),
B = sequences in the step, M = max KV blocks of any sequence in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    query_start: torch.Tensor  # [B+1] int64, cumulative count of new tokens per sequence
    context_lens: torch.Tensor  # [B] int64, tokens of each sequence in the KV cache after this step
    block_tables: torch.Tensor  # [B, M] int64, physical KV block ids, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset where each new token's K/V goes
    logits_index: torch.Tensor  # [B] int64, row in T of each sequence's last new token
    # most new tokens of one sequence when the host knows it (None: derive it, a device read); the
    # torch attention path sizes its padded query layout with it
    max_query: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])
