"""Per-request sampling state on the device, one row ("slot") per admitted request.

Written once when a request is admitted (its parameters, its stop ids, its logit bias, its prompt
tokens for the repetition penalty) and then only by device ops: after every sampled token the
sampler bumps the slot's step counter and its output-token counts from the sampled ids themselves,
so no step needs the host to rebuild or even look at this state. A step only hands the sampler the
[B] slot indices of its rows.

The [S, V] token-count tables that penalties need are allocated the first time a penalised request
is admitted (S = max sequences, V = vocabulary: 256 x 152k int32 = 156 MB), never for servers that
see no penalties.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from actors.device import h2d
from actors.engine.sampling_params import SamplingParams


@dataclass
class SlotFlags:
    """What the host knows about a slot without touching the device: which batch-wide passes the
    rows of a step need (a pass a row does not need is left out or given neutral values)."""

    greedy: bool
    penalised: bool
    biased: bool
    min_tokens: bool
    min_p: bool
    top_k_p: bool
    logprobs: int  # -1 = none


class SlotTable:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.vocab = vocab_size
        self.device = device
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.long, device=device)
        self.temperature = torch.ones(num_slots, **f32)  # 0 = greedy
        self.top_k = torch.full((num_slots,), vocab_size, **i64)
        self.top_p = torch.ones(num_slots, **f32)
        self.min_p = torch.zeros(num_slots, **f32)
        self.presence = torch.zeros(num_slots, **f32)
        self.frequency = torch.zeros(num_slots, **f32)
        self.repetition = torch.ones(num_slots, **f32)
        self.min_tokens = torch.zeros(num_slots, **i64)
        self.seed = torch.zeros(num_slots, **i64)
        self.step = torch.zeros(num_slots, **i64)  # tokens generated so far: the noise counter
        self.stop_ids = torch.zeros(num_slots, 1, **i64)  # masked while step < min_tokens
        self.bias_ids = torch.zeros(num_slots, 1, **i64)  # sparse logit bias, padded with (0, 0.0)
        self.bias_vals = torch.zeros(num_slots, 1, **f32)
        self.counts: torch.Tensor | None = None  # [S, V] int32 output-token counts
        self.prompt_seen: torch.Tensor | None = None  # [S, V] bool prompt tokens
        self.flags: list[SlotFlags | None] = [None] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    # ---- admission and release (host, once per request) ------------------------------------------

    def acquire(self, params: SamplingParams, token_ids: list[int], num_prompt: int, stop_ids: list[int]) -> int:
        """Take a free slot and write the request's parameters into it; `token_ids` are its prompt and
        any tokens already generated (a preempted request keeps its slot, so normally just the prompt)."""
        if not self._free:
            raise RuntimeError("no free sampling slot: more running requests than max_num_seqs")
        slot = self._free.pop()
        p = params
        self.temperature[slot] = 0.0 if p.temperature == 0 else p.temperature
        self.top_k[slot] = p.top_k if 0 < p.top_k < self.vocab else self.vocab
        self.top_p[slot] = p.top_p
        self.min_p[slot] = p.min_p
        self.presence[slot] = p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.repetition[slot] = p.repetition_penalty
        self.min_tokens[slot] = p.min_tokens
        self.seed[slot] = p.seed if p.seed is not None else random.getrandbits(63)
        self.step[slot] = len(token_ids) - num_prompt
        self._write_padded("stop", slot, stop_ids if p.min_tokens else [])
        bias = [(t, b) for t, b in p.logit_bias.items() if 0 <= t < self.vocab]
        self._write_padded("bias", slot, bias)
        if p.penalised:
            self._write_counts(slot, token_ids, num_prompt)
        elif self.counts is not None:
            self.counts[slot].zero_()
            self.prompt_seen[slot].zero_()
        self.flags[slot] = SlotFlags(
            greedy=p.temperature == 0,
            penalised=p.penalised,
            biased=bool(bias),
            min_tokens=p.min_tokens > 0 and bool(stop_ids),
            min_p=p.min_p > 0,
            top_k_p=0 < p.top_k < self.vocab or p.top_p < 1,
            logprobs=-1 if p.logprobs is None else p.logprobs,
        )
        return slot

    def release(self, slot: int) -> None:
        self.flags[slot] = None
        self._free.append(slot)

    def _write_padded(self, kind: str, slot: int, items: list) -> None:
        width = max(1, len(items))
        if kind == "stop":
            if width > self.stop_ids.shape[1]:
                self.stop_ids = _widen(self.stop_ids, width)
            row = list(items) + [items[0] if items else 0] * (self.stop_ids.shape[1] - len(items))
            self.stop_ids[slot] = h2d(torch.tensor(row, dtype=torch.long), self.device)
            return
        if width > self.bias_ids.shape[1]:
            self.bias_ids, self.bias_vals = _widen(self.bias_ids, width), _widen(self.bias_vals, width)
        pad = self.bias_ids.shape[1] - len(items)
        # pinned copies: a pageable one would wait for the steps in flight (async scheduling)
        self.bias_ids[slot] = h2d(torch.tensor([t for t, _ in items] + [0] * pad, dtype=torch.long), self.device)
        self.bias_vals[slot] = h2d(torch.tensor([b for _, b in items] + [0.0] * pad, dtype=torch.float32), self.device)

    def _write_counts(self, slot: int, token_ids: list[int], num_prompt: int) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.num_slots, self.vocab, dtype=torch.int32, device=self.device)
            self.prompt_seen = torch.zeros(self.num_slots, self.vocab, dtype=torch.bool, device=self.device)
        ids = h2d(torch.tensor(token_ids, dtype=torch.long), self.device)
        self.prompt_seen[slot].zero_()
        self.prompt_seen[slot, ids[:num_prompt]] = True
        self.counts[slot].zero_()
        out = ids[num_prompt:]
        self.counts[slot].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    # ---- per step (device only) -------------------------------------------------------------------

    def advance(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """After sampling: count the new tokens and move the noise counters, on the device."""
        self.step.index_add_(0, slots, torch.ones_like(slots))
        if self.counts is not None:
            self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(t.shape[0], width, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    if t.dtype == torch.long:  # padding ids repeat the row's first id (neutral for a scatter of -inf)
        out[:, t.shape[1] :] = t[:, :1]
    return out
