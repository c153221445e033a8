"""Turns the last-token logits of every sequence in a step into its next token.

Shape legend: B = sequences that sample this step, V = vocabulary.

Greedy rows take the argmax. Other rows are scaled by their temperature, cut to top-k and top-p
(each row with its own values, in one batched pass), and sampled by the exponential race
argmax(p / q), q ~ Exp(1), which draws exactly from p. A request with a seed draws its q from its
own torch.Generator, V numbers per token, so its tokens depend only on its seed and its logits,
never on which other requests share the batch.
"""

from __future__ import annotations

import torch

from actors.engine.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:  # [B] int64
        greedy_tokens = logits.argmax(dim=-1)
        greedy = [p.greedy for p in params]
        if all(greedy):
            return greedy_tokens

        device = logits.device
        # greedy rows get temperature 1 so the division stays finite; their result is replaced
        temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=device)
        scaled = logits / temperature[:, None]
        probs = scaled.softmax(dim=-1)
        # rows with top-k / top-p take the sorting path; which path a row takes depends only on
        # its own parameters, so its numbers never depend on its batch mates
        cut = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
        if cut:
            top_k = torch.tensor([params[i].top_k for i in cut], device=device)
            top_p = torch.tensor([params[i].top_p for i in cut], device=device)
            probs[cut] = self._filtered_probs(scaled[cut], top_k, top_p)

        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(torch.tensor(greedy, device=device), greedy_tokens, sampled)

    @staticmethod
    def _filtered_probs(
        logits: torch.Tensor,  # [B, V] already divided by temperature
        top_k: torch.Tensor,  # [B] int, 0 = off
        top_p: torch.Tensor,  # [B] float, 1 = off
    ) -> torch.Tensor:  # [B, V] probabilities, zero outside each row's kept set
        vocab = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        drop = rank[None, :] >= k[:, None]  # [B, V] outside top-k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # keep a token while the mass strictly before it is below top_p (the first always stays);
        # rows with top_p = 1 are left alone, float rounding could otherwise clip their tail
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
