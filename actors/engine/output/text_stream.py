"""One request's token outputs -> the same outputs with their text, stop strings applied.

The engine decides where a request ends on tokens (stop token ids, EOS, grammar, max_tokens); the
text stream decides where it ends on text: a stop string ends it at the token that completes the
match, every token after that one is dropped (never sent) and the output says 'stop'. Whoever runs
the stream frees the request in the engine when the text ended it first (`ended_early`): the step
thread itself for offline use (LLMEngine.make_text), else the consumer's side of the async engine
(actors/engine/async_engine.py), so detokenising never runs on the step thread while serving.
"""

from __future__ import annotations

from typing import Any

from actors.engine.output.detokenizer import IncrementalDetokenizer
from actors.engine.sampling_params import SamplingParams


class TextStream:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams,
                 generated: list[int] = ()) -> None:
        """`generated`: a continuation's tokens already sent elsewhere (LLMEngine.add_request): the
        detokenizer is replayed over them, so held-back text and partial stop-string matches are
        what they were when the first replica sent them, and nothing of theirs is sent again."""
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        for t in generated:
            self.detokenizer.step(t)
        self.done = False  # the request has ended; later outputs are dropped

    def apply(self, out: Any) -> Any | None:
        """Fill `out.new_text` (in place: the output belongs to this request alone) and return it;
        cut it at a stop string; None once the request has ended."""
        if self.done:
            return None
        ids = out.new_token_ids
        shown = len(ids) - 1 if out.ends_with_stop_token else len(ids)  # a stop token is not text
        parts = []
        for i in range(shown):
            parts.append(self.detokenizer.step(ids[i]))
            if self.detokenizer.stopped:
                return self._cut(out, i + 1, "".join(parts))
        if out.finished and out.finish_reason in ("stop", "length"):
            parts.append(self.detokenizer.flush())  # held-back text and dangling bytes go out last
        out.new_text = "".join(parts)
        self.done = out.finished
        return out

    @staticmethod
    def ended_early(engine_finished: bool, out: Any | None) -> bool:
        """The text ended a request the engine still runs: it must be aborted to free its KV."""
        return out is not None and out.finished and not engine_finished

    def _cut(self, out: Any, keep: int, text: str) -> Any:
        """End at the token that completed the stop string: it counts, the ones after it do not exist."""
        self.done = True
        dropped = len(out.new_token_ids) - keep
        out.new_token_ids = out.new_token_ids[:keep]
        if out.logprobs:
            out.logprobs = out.logprobs[:keep]
        out.new_text = text
        out.completion_tokens -= dropped
        out.finished, out.finish_reason, out.ends_with_stop_token = True, "stop", False
        return out
