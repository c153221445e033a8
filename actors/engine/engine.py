"""The serving engine of one attention replica: requests in, token/text deltas out, one step at a
time. Single-threaded; actors/engine/async_engine.py drives it from a background thread.

A step: the scheduler picks sequences and token counts, the model runner (actors/engine/model_runner.py)
turns them into last-token logits, the sequences whose whole context is now computed sample a token,
and stop conditions and text deltas are worked out.

Shape legend: T = tokens in the step, B = sequences in the step, M = widest block table, V = vocab.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


from actors.engine.block_manager import BlockManager
from actors.engine.detokenizer import IncrementalDetokenizer
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampler import Sampler, make_generator
from actors.engine.sampling_params import SamplingParams
from actors.engine.model_runner import ModelRunner
from actors.engine.scheduler import Scheduler
from actors.engine.sequence import Sequence


@dataclass(frozen=True)
class EngineSpec:
    max_model_len: int  # context length: prompt + completion
    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    ping_pong: bool = False  # two micro-batches per step (remote experts)
    enable_prefix_caching: bool = True  # share full KV blocks of identical prefixes between requests


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | 'abort' | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_usage: float  # fraction of KV blocks in use, 0..1
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    tokens_generated: int
    steps: int
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # ... of which were found there


class LLMEngine:
    def __init__(self, loaded: Any, spec: EngineSpec) -> None:
        """`loaded` is a LoadedModel (actors/weights/loader.py): .model, .cfg, .tokenizer."""
        self.model = loaded.model
        self.cfg = loaded.cfg
        self.tokenizer = loaded.tokenizer
        self.name = getattr(loaded, "name", "model")
        self.spec = spec
        self.runner = ModelRunner(self.model, self.cfg, spec.num_kv_blocks, spec.block_size, ping_pong=spec.ping_pong)
        self.kv = self.runner.kv
        self.blocks = BlockManager(spec.num_kv_blocks, spec.block_size, spec.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, spec.max_num_seqs, spec.max_num_batched_tokens)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.cfg.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._tokens_generated = 0
        self._steps = 0

    # ---- requests ---------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise RequestRejected if the request can never run; return its completion-token cap.
        Reads only fixed configuration, so any thread may call it."""
        n = len(prompt_token_ids)
        limit = self.spec.max_model_len
        if n == 0:
            raise RequestRejected("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        if n >= limit:
            raise RequestRejected(f"the prompt has {n} tokens but the context length is {limit}")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise RequestRejected(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                f"context length of {limit} tokens; lower max_tokens or shorten the prompt"
            )
        need = self.blocks.blocks_for(n + max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestRejected(
                f"the request needs up to {n + max_tokens} tokens of KV cache but this replica holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; lower max_tokens"
            )
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already running")
        max_tokens = self.check_request(prompt_token_ids, params)
        prompt = [int(t) for t in prompt_token_ids]
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=params,
            max_total_tokens=len(prompt) + max_tokens,
            arrival=next(self._arrivals),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt, params.stop),
            generator=None if params.seed is None else make_generator(params.seed, self.runner.device),
        )
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request wherever it is and free its KV blocks; None if it is not known."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def run_to_completion(self, max_steps: int = 10_000) -> dict[str, list[int]]:
        """Step until nothing is left (bounded): new token ids per request id, in order. For
        offline use, benchmarks and tests; the server streams through AsyncEngine instead."""
        out: dict[str, list[int]] = {rid: [] for rid in self._seqs}
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            for o in self.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    def unfinished_request_ids(self) -> list[str]:
        return list(self._seqs)

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_usage=self.blocks.usage,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            preemptions=self.scheduler.num_preemptions,
            tokens_generated=self._tokens_generated,
            steps=self._steps,
            prefix_cache_queried_tokens=self.blocks.queried_tokens,
            prefix_cache_hit_tokens=self.blocks.hit_tokens,
        )

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.execute(scheduled)  # [B, V]
        self._steps += 1

        sampling: list[int] = []  # rows of sequences whose whole context is now in the cache
        for row, (seq, n) in enumerate(zip(scheduled.seqs, scheduled.num_new_tokens)):
            seq.num_computed_tokens += n
            self.blocks.commit(seq)  # its K/V are written now: full blocks may serve other requests
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(row)
        if not sampling:
            return []
        seqs = [scheduled.seqs[r] for r in sampling]
        rows = logits if len(sampling) == len(scheduled) else logits[sampling]
        tokens = self.sampler(rows, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        self._tokens_generated += len(tokens)
        return [self._append_token(seq, tok) for seq, tok in zip(seqs, tokens)]

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        params = seq.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            # the stop token counts as a completion token but is not part of the text
            return self._finish(seq, "stop", token, seq.detokenizer.flush())
        text = seq.detokenizer.step(token)
        if seq.detokenizer.stopped:
            return self._finish(seq, "stop", token, text)
        if seq.num_tokens >= seq.max_total_tokens:
            return self._finish(seq, "length", token, text + seq.detokenizer.flush())
        return self._output(seq, [token], text)

    def _finish(self, seq: Sequence, reason: str, token: int, text: str) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        del self._seqs[seq.request_id]
        return self._output(seq, [token], text)

    @staticmethod
    def _output(seq: Sequence, new_ids: list[int], text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
            cached_tokens=seq.num_cached_tokens or 0,
        )
