"""How one request wants its tokens chosen and when it wants them to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.engine.request_rejected import RequestRejected


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # 0 = every token
    seed: int | None = None  # same seed -> same tokens, whoever shares the batch
    max_tokens: int | None = 16  # None = up to the context length
    stop: list[str] = field(default_factory=list)  # excluded from the output text, as in OpenAI
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]  # an empty stop string would match everywhere
        self.stop_token_ids = list(self.stop_token_ids)
        if self.temperature < 0:
            raise RequestRejected(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestRejected(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestRejected(f"top_k must be >= 0 (0 = disabled), got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
