"""The single-process reference: greedy decoding of one sequence, nothing shared, no scheduler.

Every other path (engine batching, ping-pong, remote experts, migration) must produce the tokens
this produces. It runs the same MoGEModel with a private PagedKVCache: the prompt as one prefill
step, then one token per step.
"""

from __future__ import annotations

import torch

from actors.model.kv_cache import PagedKVCache
from actors.model.step_batch import StepBatch

_BLOCK = 16


def one_sequence_batch(new_ids: list[int], start: int, block_table: torch.Tensor, device) -> StepBatch:
    """StepBatch for one sequence adding new_ids at positions start.. (blocks already allotted)."""
    n = len(new_ids)
    positions = torch.arange(start, start + n, device=device)
    slots = block_table[positions // _BLOCK] * _BLOCK + positions % _BLOCK
    return StepBatch(
        input_ids=torch.tensor(new_ids, dtype=torch.long, device=device),
        positions=positions,
        query_start=torch.tensor([0, n], dtype=torch.long, device=device),
        context_lens=torch.tensor([start + n], dtype=torch.long, device=device),
        block_tables=block_table.unsqueeze(0),
        slot_mapping=slots,
        logits_index=torch.tensor([n - 1], dtype=torch.long, device=device),
    )


@torch.no_grad()
def greedy_logits(loaded, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True):
    """-> (generated ids, logits [steps, V] float32 that chose each of them)."""
    model, cfg = loaded.model, loaded.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = len(prompt_ids) + max_new_tokens
    num_blocks = -(-total // _BLOCK)
    kv = PagedKVCache.for_model(cfg, num_blocks, _BLOCK, dtype, device)
    block_table = torch.arange(num_blocks, device=device)
    eos = set(_eos_ids(loaded)) if stop_at_eos else set()

    out: list[int] = []
    all_logits = []
    new, start = list(prompt_ids), 0
    for _ in range(max_new_tokens):
        logits = model(one_sequence_batch(new, start, block_table, device), kv)[0]
        token = int(torch.argmax(logits).item())
        out.append(token)
        all_logits.append(logits)
        if token in eos:
            break
        start += len(new)
        new = [token]
    return out, torch.stack(all_logits) if all_logits else torch.empty(0)


def greedy_reference(loaded, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """Greedy tokens after prompt_ids (the EOS that ends generation is included)."""
    return greedy_logits(loaded, prompt_ids, max_new_tokens, stop_at_eos)[0]


def _eos_ids(loaded) -> list[int]:
    tok = getattr(loaded, "tokenizer", None)
    return list(getattr(tok, "eos_token_ids", None) or loaded.cfg.eos_token_ids)
