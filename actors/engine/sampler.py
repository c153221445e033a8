"""Turns the last-token logits of every sequence in a step into its next token, on the device.

Shape legend: B = sequences that sample this step, V = vocabulary, K = top log-probs asked for.

Every per-request parameter lives in a SlotTable row (actors/engine/sampling/slots.py) written at
admission; a step hands over only the [B] slot indices. The work is a fixed chain of batched tensor
ops, each applied to the whole batch with neutral values for rows that do not use it (which leave the
row bit-for-bit unchanged), and a pass is skipped outright when no row of the step needs it — a host
decision from the slots' flags, never from device values. So a row's result depends only on its own
logits and parameters, never on its batch mates, and the step needs no host sync until the one copy
of the results.

Chain (the order vLLM uses): raw logits -> logit_bias (scatter-add of the sparse bias) -> penalties
(repetition on prompt + output tokens, frequency and presence on output tokens, from device-side
counts) -> min_tokens (stop ids at -inf while too few tokens) -> grammar mask -> greedy rows take the
argmax here (temperature 0: exactly argmax of the raw logits when nothing above applies) -> / temperature ->
min_p -> top_k -> top_p -> Gumbel race with counter-based noise (sampling/noise.py: same seed, same
tokens, whatever the batch).

Log-probabilities are the model's own: log_softmax of the raw logits, before any processing (vLLM's
default "raw" logprobs), so a scoring client sees the model's distribution whatever it sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.engine.sampling import noise
from actors.engine.sampling.slots import SlotFlags, SlotTable

NEG_INF = float("-inf")


@dataclass
class SampledStep:
    """A step's results, still on the device until to_host()."""

    tokens: torch.Tensor  # [B] int64
    packed: torch.Tensor | None  # [B, 2 + 2K] float32: token, its logprob, K top ids, K top logprobs
    k: int

    def start_copy(self) -> "HostResults":
        """Queue the step's single device->host copy without waiting for it (pinned memory and an
        event on CUDA): the host goes on preparing the next step while the device finishes this one."""
        src = self.packed if self.packed is not None else self.tokens
        if src.device.type != "cuda":
            return HostResults(src.cpu(), self.packed is not None, self.k, None)
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return HostResults(host, self.packed is not None, self.k, done)

    def to_host(self) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]] | None]:
        return self.start_copy().get()


@dataclass
class HostResults:
    """A step's results on their way to the host."""

    host: torch.Tensor
    packed: bool
    k: int
    done: "torch.cuda.Event | None"

    def get(self) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]] | None]:
        """Token ids, and per row (logprob of the sampled token, [(id, logprob)] of the top k) when
        some row asked for log-probs; waits for the copy."""
        if self.done is not None:
            self.done.synchronize()
        if not self.packed:
            return self.host.tolist(), None
        rows = self.host.tolist()
        k = self.k
        tokens = [int(r[0]) for r in rows]
        lps = [(r[1], [(int(i), lp) for i, lp in zip(r[2 : 2 + k], r[2 + k :])]) for r in rows]
        return tokens, lps


class Sampler:
    def __init__(self, table: SlotTable) -> None:
        self.table = table

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        slots: torch.Tensor,  # [B] int64 on the logits' device
        flags: list[SlotFlags],  # [B] host-side, same order
        allowed: torch.Tensor | None = None,  # [B, V] bool grammar mask, None = unconstrained
    ) -> SampledStep:
        t = self.table
        vocab = logits.shape[1]
        k = max(f.logprobs for f in flags)
        raw_logprobs = logits.log_softmax(dim=-1) if k >= 0 else None

        x = logits
        if any(f.biased for f in flags):
            x = x.scatter_add(1, t.bias_ids[slots], t.bias_vals[slots])
        if any(f.penalised for f in flags):
            x = apply_penalties(x, t.counts[slots], t.prompt_seen[slots],
                                t.presence[slots], t.frequency[slots], t.repetition[slots])
        if any(f.min_tokens for f in flags):
            active = t.step[slots] < t.min_tokens[slots]  # [B]
            ids = t.stop_ids[slots]
            banned = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, active[:, None].expand_as(ids))
            x = x.masked_fill(banned, NEG_INF)
        if allowed is not None:
            x = x.masked_fill(~allowed, NEG_INF)

        tokens = x.argmax(dim=-1)
        if not all(f.greedy for f in flags):
            temperature = t.temperature[slots]
            greedy = temperature == 0
            scaled = x / torch.where(greedy, 1.0, temperature)[:, None]
            if any(f.min_p for f in flags):
                scaled = apply_min_p(scaled, t.min_p[slots])
            if any(f.top_k_p for f in flags):
                scaled = apply_top_k_top_p(scaled, t.top_k[slots], t.top_p[slots])
            drawn = (scaled + noise.gumbel(t.seed[slots], t.step[slots], vocab)).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, drawn)

        t.advance(slots, tokens)
        if raw_logprobs is None:
            return SampledStep(tokens, None, 0)
        chosen = raw_logprobs.gather(1, tokens[:, None])  # [B, 1]
        top_lp, top_ids = raw_logprobs.topk(k, dim=-1) if k > 0 else (chosen[:, :0], tokens[:, None][:, :0])
        packed = torch.cat([tokens[:, None].float(), chosen, top_ids.float(), top_lp], dim=1)
        return SampledStep(tokens, packed, k)


def apply_penalties(
    x: torch.Tensor,  # [B, V]
    counts: torch.Tensor,  # [B, V] int32 output-token counts
    prompt_seen: torch.Tensor,  # [B, V] bool
    presence: torch.Tensor,  # [B]
    frequency: torch.Tensor,  # [B]
    repetition: torch.Tensor,  # [B], 1 = off
) -> torch.Tensor:
    """vLLM / OpenAI definitions: a seen token's logit l becomes l / r if l > 0 else l * r
    (repetition, seen = in the prompt or the output), then l - frequency * count - presence * [count > 0]
    (output only). Neutral values (0, 0, 1) leave a row unchanged."""
    in_output = counts > 0
    seen = in_output | prompt_seen
    r = repetition[:, None]
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    return x - frequency[:, None] * counts - presence[:, None] * in_output


def apply_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's: in logits,
    l < l_max + log(min_p). min_p = 0 gives log 0 = -inf: nothing dropped."""
    threshold = scaled.max(dim=-1, keepdim=True).values + min_p.log()[:, None]
    return scaled.masked_fill(scaled < threshold, NEG_INF)


def apply_top_k_top_p(
    scaled: torch.Tensor,  # [B, V] logits already divided by temperature
    top_k: torch.Tensor,  # [B] int, V = off
    top_p: torch.Tensor,  # [B] float, 1 = off
) -> torch.Tensor:
    """Keep each row's k most likely tokens, then the smallest prefix (by probability) whose mass
    reaches top_p (a token stays while the mass strictly before it is below top_p; the first
    always stays). Rows with k = V and top_p = 1 come back unchanged."""
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=scaled.device)
    drop = rank[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # rows with top_p = 1 are left alone: float rounding of the cumsum could clip their tail
    drop = drop | ((mass_before >= top_p[:, None]) & (top_p[:, None] < 1))
    dropped = torch.zeros_like(drop).scatter_(1, order, drop)
    return scaled.masked_fill(dropped, NEG_INF)
