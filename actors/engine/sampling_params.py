"""How one request wants its tokens chosen, what it wants reported, and when it wants to stop.

Order in which the sampler applies the fields (actors/engine/sampler.py): logit_bias, then the
repetition / frequency / presence penalties, then min_tokens (stop ids masked), then the grammar
mask; greedy takes the argmax of that; sampling then divides by temperature, cuts by min_p, top_k and
top_p, and draws. Log-probabilities are those of the model's raw distribution (log-softmax of the
logits, before any of the above), as vLLM reports by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.engine.request_rejected import RequestRejected

MAX_LOGPROBS = 20  # top log-probabilities per position, as OpenAI allows
MAX_LOGIT_BIAS = 1024  # entries per request


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = every token
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token)
    seed: int | None = None  # same seed -> same tokens, whoever shares the batch
    max_tokens: int | None = 16  # None = up to the context length; 0 = score the prompt only
    min_tokens: int = 0  # stop ids and EOS are masked until this many tokens were generated
    stop: list[str] = field(default_factory=list)  # excluded from the output text unless include_stop_str_in_output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # CTRL-style: divides positive / multiplies negative logits of seen tokens (prompt + output)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None = none; k >= 0: the sampled token's log-prob plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: Any = None  # a compiled grammar (actors/engine/sampling/grammar.py) constraining the output

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]  # an empty stop string would match everywhere
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.temperature < 0:
            raise RequestRejected(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestRejected(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestRejected(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestRejected(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise RequestRejected(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise RequestRejected(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.repetition_penalty <= 0:
            raise RequestRejected(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise RequestRejected(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestRejected(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
