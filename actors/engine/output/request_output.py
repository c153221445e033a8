"""What the engine hands out for one request after a step, and how several of them fold into one.

Outputs fold (`coalesce`) when their consumer fell behind: a stream then sends one chunk with every
token that is waiting instead of one event per token, so a slow client costs one encode per read,
not one per step.

Timestamps are `time.monotonic()` seconds of this process (the HTTP front runs in the same
process, so it can subtract them from its own arrival time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from actors.engine.sampling.logprobs import TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # "" when the engine leaves the text to the consumer (actors/engine/output/text_stream.py)
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | 'abort' | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # per new token when the request asked for logprobs (raw model log-probabilities)
    logprobs: list[TokenLogprob] | None = None
    # once, in the first output, when it asked for prompt_logprobs: None for the first prompt token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: BaseException | None = None  # set when this request alone failed inside a step
    # the last new token is a stop token id or EOS: it counts as a completion token, is not text
    ends_with_stop_token: bool = False
    scheduled_at: float | None = None  # first time a step ran this request (queue time ends)
    first_token_at: float | None = None  # when its first token was sampled (prefill ends)
    produced_at: float | None = None  # when this output was made


def coalesce(outputs: Sequence[Any]) -> Any:
    """One output holding the tokens, text and log-probabilities of consecutive outputs of one
    request, in order; state (finished, counts, timestamps) is the last one's. Works on any
    dataclass output with `new_token_ids` and `new_text` (the fields it lacks are left alone)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    changes: dict[str, Any] = {
        "new_token_ids": [t for o in outputs for t in o.new_token_ids],
        "new_text": "".join(o.new_text for o in outputs),
    }
    if hasattr(last, "logprobs"):
        merged = [e for o in outputs for e in (o.logprobs or [])]
        changes["logprobs"] = merged or None
    if hasattr(last, "prompt_logprobs"):
        changes["prompt_logprobs"] = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(last, **changes)
