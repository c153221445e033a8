"""A step whose model work and sampling are queued on the device, and what its completion needs.

With async scheduling the engine launches step N + 1 before it completes step N (actors/engine/
engine.py), so at most two of these exist between a launch and the previous step's completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.engine.sampler import HostResults
from actors.engine.sequence import Sequence


@dataclass
class LaunchedStep:
    seqs: list[Sequence] = field(default_factory=list)  # the sequences that sampled, by sampling row
    index: list[int] = field(default_factory=list)  # where in each one's token_ids its token goes
    results: HostResults | None = None  # the batch's sampled tokens on their way to the host
    per_row: list[Any] | None = None  # or per row (tokens, logprobs) / the exception it raised
    outputs: list = field(default_factory=list)  # RequestOutputs decided at launch (finishes, failures)
