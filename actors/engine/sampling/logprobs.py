"""Log-probabilities as the engine reports them: the model's raw distribution (log_softmax of the
logits), for a sampled token or a prompt token, with the k most likely alternatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int | None = None  # 1 + how many tokens were likelier (prompt tokens; vLLM's `rank`)


def prompt_logprobs(
    logits: torch.Tensor,  # [E, V] logits of positions that predict prompt tokens
    targets: torch.Tensor,  # [E] the prompt token each row predicts
    ks: list[int],  # [E] top alternatives wanted per row
) -> list[TokenLogprob]:
    """One device->host copy for all rows."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, targets[:, None])
    rank = (lp > chosen).sum(dim=1, keepdim=True).float() + 1
    k = max(ks)
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (chosen[:, :0], targets[:, None][:, :0])
    rows = torch.cat([chosen, rank, top_ids.float(), top_lp], dim=1).cpu().tolist()
    return [
        TokenLogprob(int(t), r[0], [(int(i), v) for i, v in zip(r[2 : 2 + kk], r[2 + k : 2 + k + kk])], int(r[1]))
        for t, r, kk in zip(targets.tolist(), rows, ks)
    ]
