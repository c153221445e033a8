"""What a captured step costs by token count, measured once at start-up, and the per-step token cap
the scheduler takes from it (a step with prompt chunks next to running decodes costs at most
`ratio` times a full decode step).

The graphs are replayed over their static buffers filled with a padding layout (every sequence a
one-token decode up to max_num_seqs, past it one sequence of context 1) and random token ids, so
the routed experts see a spread of tokens as under real traffic. Attention over long contexts is
not in the profile (the padding rows read one key), which makes the reference decode step cheaper
than a loaded one and so the cap conservative: a real step at the cap costs at most the ratio.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCosts:
    ms: dict[int, float]  # bucket (tokens) -> median replay time
    reference: int  # the full decode bucket the ratio refers to
    ratio: float
    cap: int  # the most tokens a step with decodes may hold

    def describe(self) -> str:
        table = ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(self.ms.items()))
        return (f"step cost by tokens (ms) {table}; cap {self.cap} tokens = {self.ratio}x the "
                f"{self.reference}-sequence decode step ({self.ms[self.reference]:.2f} ms)")


def profile_step_costs(graphs, ratio: float, replays: int = 3, seed: int = 0) -> StepCosts | None:
    """Time the buckets from the largest decode one upwards until a step costs more than `ratio`
    times it. None when there is nothing to measure (no graph of a full decode step)."""
    decode = [tp for tp in graphs.graphs if tp <= graphs.max_seqs]
    if not decode or ratio <= 0:
        return None
    reference = max(decode)
    vocab = graphs.model.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    costs: dict[int, float] = {}
    cap = reference
    for tp in sorted(t for t in graphs.graphs if t >= reference):
        flat, _ = graphs._fill(None, tp)
        flat[:tp] = torch.randint(0, vocab, (tp,), generator=gen).tolist()
        graphs.fixed[: len(flat)].copy_(torch.tensor(flat, dtype=torch.long))
        graphs.replay_bucket(tp)  # warm
        times = []
        for _ in range(replays):
            start.record()
            graphs.replay_bucket(tp)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        costs[tp] = statistics.median(times)
        if costs[tp] > ratio * costs[reference]:
            break
        cap = tp
    result = StepCosts(costs, reference, ratio, cap)
    log.info("scheduler: %s", result.describe())
    return result
